"""Seed 004's task messages to and from jobs: a submission read from its request, a job's
status as a TaskStatusResponse, its stage runs as agent executions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from jobs import selectors, services
from jobs.api.serializers import MAX_TIMEOUT_S
from jobs.grpc.protocol import (
    EXECUTION_MODE_PARAM,
    SEED_TASK_TYPES,
    STATUS_OF_JOB,
    STATUS_OF_STAGE,
    TASK_ID_MAX_CHARS,
    orchestrator_pb2,
)
from jobs.models import Job, JobStatus, StageRun, StageStatus
from jobs.pipelines import registry as pipelines
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import ApiKey
from omniva.null_character import refuse_null_character

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
