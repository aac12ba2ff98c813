"""The update stream of a task (StreamTaskUpdates): the job's rows of the activity outbox
as TaskUpdates, resumed after any sequence it sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from jobs.grpc.messages import _ms, _validation_error, error_message
from jobs.grpc.protocol import LAST_EVENT_ID_METADATA, STATUS_OF_JOB, orchestrator_pb2
from jobs.models import FINISHED_STATUSES, Job
from omniva.models import ACTIVITY_CHANNEL, Activity
from omniva.notifications import Listener
from omniva.row_ids import row_id

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

    status: orchestrator_pb2.TaskStatus
    progress: int

    def follow(self, row: Mapping[str, Any]) -> None:
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


def _rows_after(job_id: Any, sequence: int) -> tuple[bool, Sequence[Mapping[str, Any]]]:
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


def task_update(job: Job, row: Mapping[str, Any], state: TaskState) -> Any:
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
        metadata = dict(context.invocation_metadata() or ())
        raw = metadata.get(LAST_EVENT_ID_METADATA, "0")
        sequence = row_id(raw.strip()) if isinstance(raw, str) else None
        if sequence is None:
            raise _validation_error(
                LAST_EVENT_ID_METADATA, "last-event-id is a sequence (a whole number)."
            )
    if sequence < 0:
        raise _validation_error("after_sequence", "after_sequence is 0 or more.")
    return sequence
