"""Seed 004's gRPC OrchestratorService over the job engine (docs/grpc.md).

A task is a job: `task_type` names the pipeline, `inputs`, `metadata` and
`execution_mode` become its params, `timeout_ms` its timeout, `task_id` its idempotency
key; agent executions are its stage runs; a stream of task updates is the job's rows of
the activity outbox (omniva.models.Activity), so it resumes after any sequence it sent.
Callers authenticate with an API key (`x-api-key` or `authorization: Bearer` metadata),
are held to the same scopes, project binding and rate limit as on REST, and errors are
OmnivaError codes turned into gRPC status codes by one table (`STATUS_OF_ERROR`).

This module is the servicer and its server; the tables and the generated modules are in
protocol.py, the task messages in messages.py, the update stream in stream.py.

The servicer is synchronous: each call runs on a thread of the server's pool with a
Django database connection of its own, closed when the call ends. The protobuf modules
are generated from protos/ by jobs/grpc/codegen.py, run by `make` (never on import).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from django.db import close_old_connections

from jobs import selectors, services
from jobs.grpc.messages import (
    _validation_error,
    refuse_null_character_in,
    submission_of,
    task_of_caller,
    task_status_response,
    timeout_s_of,
)
from jobs.grpc.protocol import (
    DEFAULT_PRIORITY,
    ERROR_CODE_METADATA,
    ERROR_DETAILS_METADATA,
    RETRY_AFTER_METADATA,
    STATUS_OF_JOB,
    TASK_ID_MAX_CHARS,
    grpc_status_for,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
)
from jobs.grpc.stream import (
    STREAM_CHECK_S,
    _resume_after,
    _rows_after,
    _task_state_at,
    activity_listener,
    final_update,
    task_update,
)
from jobs.models import Job
from omniva import access
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import ApiKey, Scope
from omniva.null_character import refuse_null_character

logger = logging.getLogger("omniva.grpc")


# --- calls: authentication, connections, errors ---------------------------------------------


def presented_key(metadata: Any) -> str | None:
    """The API key of `x-api-key`, else of `authorization: Bearer <key>` (gRPC metadata
    keys arrive lowercased)."""
    values = {item.key: item.value for item in metadata or () if isinstance(item.value, str)}
    header = values.get("x-api-key", "").strip()
    if header:
        return header
    scheme, _, credentials = values.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def caller_key(context: grpc.ServicerContext, scope: str) -> ApiKey:
    """The caller's API key, allowed `scope` and within its rate limit, or OmnivaError."""
    raw = presented_key(context.invocation_metadata())
    if raw is None:
        raise OmnivaError(
            ErrorCode.UNAUTHENTICATED,
            "Send an API key in the x-api-key or the authorization (Bearer) metadata.",
        )
    key = access.api_key_authenticate(raw=raw)
    access.api_key_admit(key=key, scope=scope)
    return key


def _abort(context: grpc.ServicerContext, error: OmnivaError) -> None:
    trailing: list[tuple[str, str | bytes]] = [(ERROR_CODE_METADATA, str(error.code))]
    if error.details:
        trailing.append((ERROR_DETAILS_METADATA, json.dumps(error.details, default=str)))
    if error.retry_after_s:
        trailing.append((RETRY_AFTER_METADATA, str(error.retry_after_s)))
    context.set_trailing_metadata(tuple(trailing))
    context.abort(grpc_status_for(error.code), error.message)


def _unexpected(method: str) -> OmnivaError:
    logger.exception("gRPC %s failed", method)
    return OmnivaError(ErrorCode.INTERNAL_ERROR, "Internal error; it has been logged.")


def rpc(scope: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A servicer method's frame: database connections fresh at its start and closed at
    its end (what Django does around a request), the caller's key checked for `scope`
    and passed on, and OmnivaError (or any exception, as INTERNAL without its details)
    turned into the call's status."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                failure: OmnivaError | None = None
                close_old_connections()
                try:
                    key = caller_key(context, scope)
                    refuse_null_character_in(request)
                    yield from method(self, request, context, key)
                except OmnivaError as error:
                    failure = error
                except Exception:
                    failure = _unexpected(method.__name__)
                finally:
                    close_old_connections()
                if failure is not None:
                    _abort(context, failure)

            return stream

        @functools.wraps(method)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            failure: OmnivaError | None = None
            close_old_connections()
            try:
                key = caller_key(context, scope)
                refuse_null_character_in(request)
                return method(self, request, context, key)
            except OmnivaError as error:
                failure = error
            except Exception:
                failure = _unexpected(method.__name__)
            finally:
                close_old_connections()
            # Outside the handlers: context.abort raises a bare Exception of its own.
            _abort(context, failure)
            return None

        return unary

    return decorate


# --- the servicer --------------------------------------------------------------------------


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self) -> None:
        # Set when the server stops: open streams end (UNAVAILABLE, so clients resume).
        self.stopping = threading.Event()

    @rpc(Scope.JOBS_WRITE)
    def SubmitTask(self, request: Any, context: grpc.ServicerContext, key: ApiKey) -> Any:
        submission = submission_of(request)
        refuse_null_character(submission.params, root="params")  # from a json input
        priority = request.priority if request.HasField("priority") else DEFAULT_PRIORITY
        task_id = request.task_id.strip()
        if len(task_id) > TASK_ID_MAX_CHARS:
            raise _validation_error(
                "task_id", f"task_id is at most {TASK_ID_MAX_CHARS} characters."
            )
        job, created = services.job_submit(
            pipeline=submission.pipeline,
            params=submission.params,
            priority=services.parse_priority(priority),
            timeout_s=timeout_s_of(request),
            project=key.project,
            idempotency_key=task_id or None,
            bound_project=key.project,
        )
        message = (
            "Task submitted."
            if created
            else f"Task {task_id} was submitted before; this is that task."
        )
        return orchestrator_pb2.TaskResponse(
            task_id=str(job.pk),
            status=STATUS_OF_JOB[job.status],
            message=" ".join([message, *submission.notes]),
            estimated_completion_ms=selectors.estimated_completion_ms(job) or 0,
            created=created,
        )

    @rpc(Scope.JOBS_READ)
    def GetTaskStatus(self, request: Any, context: grpc.ServicerContext, key: ApiKey) -> Any:
        [job] = services.jobs_settle_due(jobs=[task_of_caller(request.task_id, key)])
        return task_status_response(job)

    @rpc(Scope.JOBS_READ)
    def StreamTaskUpdates(
        self, request: Any, context: grpc.ServicerContext, key: ApiKey
    ) -> Iterator[Any]:
        job = task_of_caller(request.task_id, key)
        sequence = _resume_after(request, context)
        state = _task_state_at(job, sequence)
        sent = False
        while True:
            if self.stopping.is_set():
                raise OmnivaError(
                    ErrorCode.SERVICE_UNAVAILABLE,
                    "The server is stopping; resume after the last sequence you received.",
                )
            if not context.is_active():
                return
            ended, rows = activity_listener.wait_until(
                "",
                read=functools.partial(_rows_after, job.pk, sequence),
                done=lambda found: found[0] or bool(found[1]),
                timeout_s=STREAM_CHECK_S,
            )
            for row in rows:
                state.follow(row)
                yield task_update(job, row, state)
                sequence = row["id"]
                sent = True
            if ended:
                if not sent:
                    current = Job.objects.filter(pk=job.pk).first()
                    if current is None:
                        raise OmnivaError(ErrorCode.JOB_NOT_FOUND, f"Task {job.pk} was deleted.")
                    yield final_update(current, sequence)
                return

    @rpc(Scope.JOBS_WRITE)
    def CancelTask(self, request: Any, context: grpc.ServicerContext, key: ApiKey) -> Any:
        job = task_of_caller(request.task_id, key)
        job, finished = services.job_cancel(job_id=job.pk, reason=request.reason.strip())
        return orchestrator_pb2.TaskCancelResponse(
            success=True,
            message="Task cancelled."
            if finished
            else "Cancel requested; the task stops at its running stage's next checkpoint.",
            status=STATUS_OF_JOB[job.status],
        )


# --- the server ----------------------------------------------------------------------------


@dataclass
class OrchestratorServer:
    """A gRPC server with the OrchestratorService, bound to `port` (not yet started)."""

    server: grpc.Server
    servicer: OrchestratorServicer
    port: int

    def start(self) -> None:
        self.server.start()

    def stop(self, grace_s: float) -> None:
        """Refuse new calls, end open streams, and give unary calls `grace_s` to finish."""
        self.servicer.stopping.set()
        self.server.stop(grace_s).wait()
        activity_listener.stop()


def build_server(*, host: str, port: int, workers: int) -> OrchestratorServer:
    """The server on host:port (0: a free port), serving at most `workers` calls at once;
    more are refused with RESOURCE_EXHAUSTED. A stream holds its worker while it is open.
    Raises RuntimeError when the address cannot be bound."""
    servicer = OrchestratorServicer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=workers,
        # A second server on a port in use is an error, not a silent share of its calls.
        options=[("grpc.so_reuseport", 0)],
    )
    orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"could not bind {address}")
    return OrchestratorServer(server=server, servicer=servicer, port=bound)
