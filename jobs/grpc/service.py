"""Seed 004's gRPC OrchestratorService over the job engine (docs/grpc.md).

A task is a job: `task_type` names the pipeline, `inputs`, `metadata` and
`execution_mode` become its params, `timeout_ms` its timeout, `task_id` its idempotency
key; agent executions are its stage runs; a stream of task updates is the job's rows of
the activity outbox (omniva.models.Activity), so it resumes after any sequence it sent.
Callers authenticate with an API key (`x-api-key` or `authorization: Bearer` metadata),
are held to the same scopes, project binding and rate limit as on REST, and errors are
OmnivaError codes turned into gRPC status codes by one table (`STATUS_OF_ERROR`).

The servicer is synchronous: each call runs on a thread of the server's pool with a
Django database connection of its own, closed when the call ends. The protobuf modules
are generated from protos/ by jobs/grpc/codegen.py, run by `make` (never on import).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from django.core.serializers.json import DjangoJSONEncoder
from django.db import close_old_connections
from django.utils import timezone

from jobs import selectors, services
from jobs.api.serializers import MAX_TIMEOUT_S
from jobs.models import FINISHED_STATUSES, Job, JobStatus, StageRun, StageStatus
from jobs.pipelines import registry as pipelines
from omniva import access
from omniva.errors import ErrorCode, OmnivaError, http_status_for
from omniva.models import ACTIVITY_CHANNEL, Activity, ApiKey, Scope
from omniva.notifications import Listener
from omniva.null_character import refuse_null_character
from omniva.row_ids import row_id

logger = logging.getLogger("omniva.grpc")

try:
    from grpc_services.generated import orchestrator_pb2, orchestrator_pb2_grpc
except ImportError as exc:  # a checkout where make never ran
    raise ImportError(
        "The gRPC code is generated from protos/ by `make grpc` (jobs/grpc/codegen.py); "
        "run it first."
    ) from exc

# --- mappings ------------------------------------------------------------------------------

# Seed 004's task types that are named otherwise here.
SEED_TASK_TYPES = {"report_generation": "report"}
EXECUTION_MODE_PARAM = {
    orchestrator_pb2.SEQUENTIAL: "sequential",
    orchestrator_pb2.PARALLEL: "parallel",
    orchestrator_pb2.HYBRID: "hybrid",
}
DEFAULT_PRIORITY = 5
TASK_ID_MAX_CHARS = 200

STATUS_OF_JOB = {
    JobStatus.PENDING: orchestrator_pb2.PENDING,
    JobStatus.RUNNING: orchestrator_pb2.RUNNING,
    JobStatus.RETRYING: orchestrator_pb2.RETRYING,
    JobStatus.COMPLETED: orchestrator_pb2.COMPLETED,
    JobStatus.FAILED: orchestrator_pb2.FAILED,
    JobStatus.CANCELLED: orchestrator_pb2.CANCELLED,
    JobStatus.TIMED_OUT: orchestrator_pb2.TIMED_OUT,
}
STATUS_OF_STAGE = {
    StageStatus.WAITING: orchestrator_pb2.PENDING,
    StageStatus.QUEUED: orchestrator_pb2.PENDING,
    StageStatus.RUNNING: orchestrator_pb2.RUNNING,
    StageStatus.COMPLETED: orchestrator_pb2.COMPLETED,
    StageStatus.FAILED: orchestrator_pb2.FAILED,
    StageStatus.CANCELLED: orchestrator_pb2.CANCELLED,
    StageStatus.TIMED_OUT: orchestrator_pb2.TIMED_OUT,
}

# The REST errors' gRPC codes. Codes not named here: *_NOT_FOUND is NOT_FOUND, a 409
# conflict is FAILED_PRECONDITION, anything else INTERNAL.
STATUS_OF_ERROR = {
    ErrorCode.MALFORMED_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.VALIDATION_ERROR: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_PIPELINE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_ACCEPTABLE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.QUEUE_SATURATED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
}
# Trailing metadata of a failed call: the OmnivaError code, its details (JSON), and for
# RESOURCE_EXHAUSTED the seconds to wait.
ERROR_CODE_METADATA = "omniva-error-code"
ERROR_DETAILS_METADATA = "omniva-error-details"
RETRY_AFTER_METADATA = "retry-after"
# A stream resumes after this request metadata when after_sequence is not given (clients
# built from the seed's own definitions have no such field).
LAST_EVENT_ID_METADATA = "last-event-id"


def grpc_status_for(code: ErrorCode) -> grpc.StatusCode:
    if code in STATUS_OF_ERROR:
        return STATUS_OF_ERROR[code]
    if code.endswith("_NOT_FOUND"):
        return grpc.StatusCode.NOT_FOUND
    if http_status_for(code) == 409:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


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
    trailing = [(ERROR_CODE_METADATA, str(error.code))]
    if error.details:
        trailing.append((ERROR_DETAILS_METADATA, json.dumps(error.details, default=str)))
    if error.retry_after_s:
        trailing.append((RETRY_AFTER_METADATA, str(error.retry_after_s)))
    context.set_trailing_metadata(trailing)
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


# --- tasks ---------------------------------------------------------------------------------


def refuse_null_character_in(message: Any) -> None:
    """INVALID_ARGUMENT naming the field where a request holds U+0000 in a string (of
    any field, nested message, repeated field or map), before anything is written."""
    pending: list[tuple[str, Any]] = [("", message)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            refuse_null_character(item, root=path)
        elif isinstance(item, bytes):
            continue
        elif hasattr(item, "ListFields"):
            for field, value in item.ListFields():
                pending.append((f"{path}.{field.name}" if path else field.name, value))
        elif isinstance(item, Mapping):
            for key, value in item.items():
                refuse_null_character(str(key), root=path)
                pending.append((f"{path}.{key}", value))
        elif isinstance(item, Iterable):
            pending.extend((f"{path}.{index}", value) for index, value in enumerate(item))


def _validation_error(field: str, message: str) -> OmnivaError:
    return OmnivaError(ErrorCode.VALIDATION_ERROR, message, details={field: [message]})


def task_of_caller(task_id: str, key: ApiKey) -> Job:
    """The job that `task_id` names for this key: its UUID, or the task_id it was
    submitted with (its idempotency key); a key bound to a project finds its own only."""
    task_id = task_id.strip()
    if not task_id:
        raise _validation_error("task_id", "task_id is required.")
    if len(task_id) > TASK_ID_MAX_CHARS:
        raise _validation_error("task_id", f"task_id is at most {TASK_ID_MAX_CHARS} characters.")
    job = selectors.job_for_caller(job_id=task_id, project=key.project)
    if job is None:
        by_task_id = Job.objects.select_related("project").filter(idempotency_key=task_id)
        if key.project is not None:
            by_task_id = by_task_id.filter(project=key.project)
        job = by_task_id.first()
    if job is None:
        raise OmnivaError(ErrorCode.JOB_NOT_FOUND, f"No task {task_id}.")
    return job


@dataclass(frozen=True)
class Submission:
    """What a TaskRequest submits: a pipeline, its params, and notes for the caller
    about parts of the request the pipeline does not take."""

    pipeline: str
    params: dict[str, Any]
    notes: tuple[str, ...]


def _input_dict(item: Any) -> dict[str, Any]:
    return {"input_id": item.input_id, "type": item.type, "data": item.data}


def _params_from_inputs(pipeline: str, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """A pipeline whose params take no `inputs` gets its params as the JSON object of one
    input of type json (none: no params)."""
    if not inputs:
        return {}
    problem = (
        f"{pipeline} takes no inputs; give its params as one input of type json whose "
        "data is a JSON object."
    )
    if len(inputs) != 1 or inputs[0]["type"] != "json":
        raise _validation_error("inputs", problem)
    try:
        params = json.loads(inputs[0]["data"])
    except ValueError:
        raise _validation_error("inputs", problem) from None
    if not isinstance(params, dict):
        raise _validation_error("inputs", problem)
    return params


def submission_of(request: Any) -> Submission:
    """The pipeline and params a TaskRequest asks for (docs/grpc.md, "Mapping").

    `inputs`, `metadata` and `execution_mode` are passed as params where the pipeline's
    params schema has them (report); else inputs carry the params (_params_from_inputs),
    and metadata and a non-default execution mode are ignored, which the response's
    message says.
    """
    task_type = request.task_type.strip()
    if not task_type:
        raise _validation_error("task_type", "task_type is required (a pipeline's name).")
    name = SEED_TASK_TYPES.get(task_type, task_type)
    if pipelines.get(name) is None:
        name = task_type  # the error names what the client sent
    definition = services.pipeline_named(name, field="task_type")
    accepted = set(definition.params_schema.get("properties", {}))
    inputs = [_input_dict(item) for item in request.inputs]
    notes: list[str] = []
    if "inputs" in accepted:
        params: dict[str, Any] = {"inputs": inputs} if inputs else {}
    else:
        params = _params_from_inputs(name, inputs)
    if request.metadata:
        if "metadata" in accepted:
            params["metadata"] = dict(request.metadata)
        else:
            notes.append(f"{name} takes no metadata; it was ignored.")
    mode = EXECUTION_MODE_PARAM.get(request.execution_mode)
    if mode is None:
        raise _validation_error("execution_mode", "execution_mode is unknown.")
    if "execution_mode" in accepted:
        params["execution_mode"] = mode
    elif request.execution_mode != orchestrator_pb2.SEQUENTIAL:
        notes.append(f"{name} has one fixed shape; execution_mode {mode} was ignored.")
    return Submission(pipeline=name, params=params, notes=tuple(notes))


def timeout_s_of(request: Any) -> int | None:
    """timeout_ms in whole seconds, rounded up; None (the server's default) when not
    given or 0."""
    if not request.HasField("timeout_ms") or request.timeout_ms == 0:
        return None
    if request.timeout_ms < 0 or request.timeout_ms > MAX_TIMEOUT_S * 1000:
        raise _validation_error(
            "timeout_ms", f"timeout_ms is 1 to {MAX_TIMEOUT_S * 1000} (or 0 for the default)."
        )
    return math.ceil(request.timeout_ms / 1000)


# --- messages ------------------------------------------------------------------------------


def _ms(moment: datetime | None) -> int:
    return round(moment.timestamp() * 1000) if moment else 0


def _elapsed_ms(start: datetime | None, end: datetime | None) -> int:
    if start is None:
        return 0
    return max(0, round(((end or timezone.now()) - start).total_seconds() * 1000))


def _json_text(value: Any) -> str:
    return json.dumps(value, cls=DjangoJSONEncoder)


def error_message(error: Any) -> Any:
    """An Error message of a job's or a stage's error dict; None when there is none."""
    if not isinstance(error, dict):
        return None
    return orchestrator_pb2.Error(
        code=str(error.get("code") or ""),
        message=str(error.get("message") or ""),
        agent_id=str(error.get("stage") or ""),
    )


def agent_execution(run: StageRun) -> Any:
    finished = run.finished_at if run.started_at else None
    return orchestrator_pb2.AgentExecution(
        agent_id=run.name,
        agent_type=run.queue or f"engine:{run.engine_type}",
        status=STATUS_OF_STAGE.get(run.status, orchestrator_pb2.TASK_STATUS_UNSPECIFIED),
        execution_time_ms=_elapsed_ms(run.started_at, finished)
        if run.status == StageStatus.RUNNING or finished
        else 0,
        stage_status=run.status,
        attempt=run.attempt,
        worker=run.worker,
        progress_percent=round(run.progress),
        started_at_ms=_ms(run.started_at),
        finished_at_ms=_ms(run.finished_at),
        output_json=_json_text(run.output) if run.output is not None else "",
        error=error_message(run.error),
    )


def task_metrics(job: Job, runs: list[StageRun]) -> Any:
    end = job.finished_at if job.is_finished else None
    return orchestrator_pb2.TaskMetrics(
        total_duration_ms=_elapsed_ms(job.created_at, end),
        queue_time_ms=_elapsed_ms(job.created_at, job.started_at or end),
        execution_time_ms=selectors.run_time_ms(job) or 0,
        retry_count=sum(max(0, run.attempt - 1) for run in runs),
        agents_used=sum(1 for run in runs if run.attempt > 0),
        attempts=job.attempts,
    )


def task_status_response(job: Job) -> Any:
    runs = list(job.stages.order_by("position", "id"))
    completed = job.status == JobStatus.COMPLETED
    return orchestrator_pb2.TaskStatusResponse(
        task_id=str(job.pk),
        status=STATUS_OF_JOB[job.status],
        agent_executions=[agent_execution(run) for run in runs],
        output=orchestrator_pb2.Output(type="json", data=_json_text(job.result))
        if completed
        else None,
        error=error_message(job.error),
        metrics=task_metrics(job, runs),
        task_type=job.pipeline,
        progress_percent=round(job.progress),
        priority=job.priority,
        created_at_ms=_ms(job.created_at),
        estimated_completion_ms=selectors.estimated_completion_ms(job) or 0,
        cancel_reason=job.cancel_reason,
    )


# --- the update stream -------------------------------------------------------------------

# The activity kinds a task's stream carries (the rows of its job; see Activity).
STREAMED_KINDS = ("job:update", "job:progress", "stage:update", "log")
JOB_KINDS = ("job:update", "job:progress")
STREAM_PAGE = 500
# How often a waiting stream looks whether its client left or the server is stopping.
STREAM_CHECK_S = 1.0

# Wakes the waiting streams on every activity commit (NOTIFY omniva_activity, payload
# empty); they also read again every STREAM_CHECK_S, should a notification be lost.
activity_listener = Listener(ACTIVITY_CHANNEL)


@dataclass
class TaskState:
    """The task's status and progress as of the last job row a stream went past."""

    status: int
    progress: int

    def follow(self, row: dict[str, Any]) -> None:
        if row["kind"] in JOB_KINDS:
            self.status = STATUS_OF_JOB.get(row["data"].get("status"), self.status)
            self.progress = round(float(row["data"].get("progress") or 0))


def _task_state_at(job: Job, sequence: int) -> TaskState:
    """The task's state as of `sequence`: its last job row up to there; the job as it
    stands when there is none (a stream from the start begins with a job row anyway)."""
    state = TaskState(STATUS_OF_JOB[job.status], round(job.progress))
    if sequence > 0:
        row = (
            Activity.objects.filter(job_id=job.pk, id__lte=sequence, kind__in=JOB_KINDS)
            .order_by("-id")
            .values("kind", "data")
            .first()
        )
        if row is not None:
            state.follow(row)
    return state


def _rows_after(job_id: Any, sequence: int) -> tuple[bool, list[dict[str, Any]]]:
    """(the job has finished and these are its last rows, its rows after `sequence`).

    The status is read first: the rows a finishing transition wrote committed with it,
    so the read after it has them all. Every transition locks the job row before it
    writes a row of the job, so a job's rows commit in id order and a row below one
    already read never appears later: the id is a safe cursor within one job.
    """
    status = Job.objects.filter(pk=job_id).values_list("status", flat=True).first()
    rows = list(
        Activity.objects.filter(job_id=job_id, id__gt=sequence, kind__in=STREAMED_KINDS)
        .order_by("id")
        .values("id", "kind", "data", "at")[:STREAM_PAGE]
    )
    ended = (status is None or status in FINISHED_STATUSES) and len(rows) < STREAM_PAGE
    return ended, rows


def task_update(job: Job, row: dict[str, Any], state: TaskState) -> Any:
    """The TaskUpdate of one activity row; `state` has followed the row already."""
    data = row["data"]
    update = orchestrator_pb2.TaskUpdate(
        task_id=str(job.pk),
        status=state.status,
        progress_percent=state.progress,
        timestamp_ms=_ms(row["at"]),
        sequence=row["id"],
        kind=row["kind"],
    )
    if row["kind"] in JOB_KINDS:
        update.message = f"task {data.get('status')}"
        if row["kind"] == "job:progress":
            update.message = f"task at {state.progress}%"
        error = error_message(data.get("error"))
        if error is not None:
            update.error.CopyFrom(error)
            update.message += f": {error.code}: {error.message}"
    elif row["kind"] == "stage:update":
        update.agent_id = str(data.get("name") or "")
        update.agent_status = str(data.get("status") or "")
        update.agent_progress_percent = round(float(data.get("progress") or 0))
        update.message = f"{update.agent_id} {update.agent_status}"
        if (data.get("attempt") or 0) > 1:
            update.message += f" (attempt {data['attempt']})"
        error = error_message(data.get("error"))
        if error is not None:
            update.error.CopyFrom(error)
    else:
        update.agent_id = str(data.get("stage") or "")
        update.level = str(data.get("level") or "")
        update.message = str(data.get("message") or "")
    return update


def final_update(job: Job, sequence: int) -> Any:
    """The task as it stands, for a stream that has no row left to send (the job's rows
    were pruned, or the caller resumed after the last one)."""
    update = orchestrator_pb2.TaskUpdate(
        task_id=str(job.pk),
        status=STATUS_OF_JOB[job.status],
        progress_percent=round(job.progress),
        timestamp_ms=_ms(job.finished_at or job.updated_at),
        sequence=sequence,
        kind="job:update",
        message=f"task {job.status}",
    )
    error = error_message(job.error)
    if error is not None:
        update.error.CopyFrom(error)
    return update


def _resume_after(request: Any, context: grpc.ServicerContext) -> int:
    sequence: Any = request.after_sequence
    if not sequence:
        metadata = {item.key: item.value for item in context.invocation_metadata() or ()}
        raw = metadata.get(LAST_EVENT_ID_METADATA, "0")
        sequence = row_id(raw.strip()) if isinstance(raw, str) else None
        if sequence is None:
            raise _validation_error(
                LAST_EVENT_ID_METADATA, "last-event-id is a sequence (a whole number)."
            )
    if sequence < 0:
        raise _validation_error("after_sequence", "after_sequence is 0 or more.")
    return sequence


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
