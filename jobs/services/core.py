"""The orchestrator's shared parts: the job lock, a stage's deadline and queue entry, how a
job finishes, batches, and the saturation guard.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection
from django.db.models import Avg
from django.utils import timezone
from django_q.signing import SignedPackage

from engines import services as engines
from jobs import broker
from jobs.models import (
    JOB_DONE_CHANNEL,
    Job,
    JobLog,
    JobStatus,
    QueueTask,
    StageRun,
    StageStatus,
)
from jobs.pipelines import registry as pipelines
from jobs.services.activity import _activity, _job_changed, _stage_changed
from omniva.errors import ErrorCode, FailureCode, OmnivaError
from omniva.prepared import prepared_cursor

BATCH_PIPELINE = "batch"


SATURATION_CACHE_S = 1.0


@dataclass(frozen=True)
class StageClaim:
    """What a worker needs to run one attempt of a stage it was granted."""

    stage_run_id: int
    job_id: str
    pipeline: str
    stage: str
    attempt: int
    token: str
    params: dict[str, Any]
    inputs: dict[str, Any]
    deadline: datetime | None
    ack_id: str | None


@dataclass(frozen=True)
class SupervisionState:
    """What the heartbeat of a running stage learns: keep going, or why to stop."""

    lease_held: bool
    cancel_requested_at: datetime | None = None
    deadline: datetime | None = None


# --- helpers shared by the transitions -----------------------------------------------------


def job_await(*, job_id: Any) -> None:
    """Someone is about to wait for the job to finish: from now on the transition that
    finishes it NOTIFYs JOB_DONE_CHANNEL. The waiter marks the job before it first reads
    it, so a finish either commits after the mark (and notifies) or before the read (and
    is seen): the finishing transition reads the flag under the job's lock, which this
    UPDATE waits for."""
    Job.objects.filter(pk=job_id, awaited=False).update(awaited=True)


def _lock_job(job_id: Any) -> Job:
    try:
        return Job.objects.select_for_update().get(pk=job_id)
    except (Job.DoesNotExist, ValueError, TypeError, DjangoValidationError):
        raise OmnivaError(ErrorCode.JOB_NOT_FOUND, f"No job {job_id}.") from None


def _lock_job_of_stage(stage_run_id: int) -> tuple[Job, StageRun] | None:
    """The stage run and its job, the job row locked, in one statement."""
    try:
        run = (
            StageRun.objects.select_related("job")
            .select_for_update(of=("job",))
            .get(pk=stage_run_id)
        )
    except StageRun.DoesNotExist:
        return None
    return run.job, run


def _log(job: Job, message: str, *, stage: str = "", level: str = "info") -> None:
    line = JobLog.objects.create(job=job, stage=stage, level=level, message=message[:10_000])
    _activity(
        "log",
        job,
        {"job_id": job.pk, "stage": stage, "level": level, "message": line.message, "at": line.at},
    )


def _lease_until(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.OMNIVA_TASK_LEASE_S)


def _deadline(job: Job) -> datetime | None:
    if job.timeout_s and job.started_at:
        return job.started_at + timedelta(seconds=job.timeout_s)
    return None


def _cancel_grace() -> timedelta:
    return timedelta(seconds=settings.OMNIVA_CANCEL_GRACE_S)


def pipeline_named(name: str, *, field: str = "pipeline") -> pipelines.Pipeline:
    """The registered pipeline `name`, or UNKNOWN_PIPELINE naming the known ones under
    `field` (what the caller called it: `pipeline`, gRPC's `task_type`)."""
    definition = pipelines.get(name)
    if definition is None:
        known = ", ".join(p.name for p in pipelines.all_pipelines())
        raise OmnivaError(
            ErrorCode.UNKNOWN_PIPELINE,
            f"Unknown {field} {name!r}; known: {known}.",
            details={field: [f"unknown: {name}"]},
        )
    return definition


def stage_task(
    *, run_id: int, pipeline: str, stage: str, queue: str, grant: dict[str, Any] | None = None
) -> str:
    """The signed django-q2 task that runs one stage: `jobs.tasks.run_stage(run_id)`, with
    the attempt's `grant` when the broker's claim started it (fastpath)."""
    return SignedPackage.dumps(
        {
            "id": uuid.uuid4().hex,
            "name": f"{pipeline}.{stage}:{run_id}",
            "func": "jobs.tasks.run_stage",
            "args": (run_id,),
            "kwargs": {} if grant is None else {"grant": grant},
            "started": timezone.now(),
            "save": False,
            "cluster": queue,
        }
    )


def task_payload(*, run: StageRun, job: Job, queue: str) -> str:
    """The signed django-q2 task that runs one stage: `jobs.tasks.run_stage(run.id)`."""
    return stage_task(run_id=run.pk, pipeline=job.pipeline, stage=run.name, queue=queue)


def _enqueue_stage(
    job: Job, run: StageRun, stage: pipelines.Stage, *, delay_s: float = 0, saved: bool = False
) -> None:
    """Queue one attempt of a stage; `saved` when the caller already stored the run queued
    and wrote its activity row."""
    if not saved:
        run.status = StageStatus.QUEUED
        run.queued_at = timezone.now()
        run.lease_token = None
        run.lease_expires_at = None
        run.save(update_fields=["status", "queued_at", "lease_token", "lease_expires_at"])
        _stage_changed(job, run)
    if stage.engine_type:
        engines.event_create(
            event_type=engines.event_type_for_engine(stage.engine_type),
            priority=job.priority,
            max_retries=job.max_retries,
            stage_run_id=run.pk,
            job_id=job.pk,
            project_id=job.project_id,
            delay_s=delay_s,
            deadline=_engine_deadline(job),
            data={
                "job_id": str(job.pk),
                "pipeline": job.pipeline,
                "stage": run.name,
                "params": job.params,
                "inputs": _parent_outputs(job.pk, job.pipeline, job.params, run.name),
            },
        )
        return
    broker.enqueue_payload(
        queue=stage.queue,
        payload=task_payload(run=run, job=job, queue=stage.queue),
        priority=job.priority,
        delay_s=delay_s,
        stage_run_id=run.pk,
    )


def _update_progress(job: Job) -> None:
    average = StageRun.objects.filter(job=job).aggregate(p=Avg("progress"))["p"] or 0.0
    job.progress = round(float(average), 2)


def _finish_job(
    job: Job,
    status: JobStatus,
    *,
    now: datetime,
    result: Any = None,
    error: dict[str, Any] | None = None,
    stage_status: StageStatus = StageStatus.CANCELLED,
    runs: list[StageRun] | None = None,
) -> None:
    """Move `job` to a final status; its unfinished stages end with `stage_status`.
    `runs`, when the caller has them, are the job's stage runs as they stand."""
    job.status = status
    job.finished_at = now
    job.next_attempt_at = None
    job.result = result
    job.error = error
    if status == JobStatus.COMPLETED:
        job.progress = 100.0
    job.save(
        update_fields=[
            "status",
            "finished_at",
            "next_attempt_at",
            "result",
            "error",
            "progress",
            "updated_at",
        ]
    )
    _job_changed(job)
    if runs is None:
        runs = list(StageRun.objects.filter(job=job))
    open_runs = [
        run for run in runs if run.status not in (StageStatus.COMPLETED, StageStatus.FAILED)
    ]
    for run in open_runs:
        if run.status in (StageStatus.QUEUED, StageStatus.RUNNING):
            run.status = stage_status
            run.finished_at = now
        run.lease_token = None
        run.lease_expires_at = None
    if open_runs:
        StageRun.objects.bulk_update(
            open_runs, ["status", "finished_at", "lease_token", "lease_expires_at"]
        )
        for run in open_runs:
            _stage_changed(job, run)
        broker.drop_stage_tasks(stage_run_ids=[run.pk for run in open_runs])
        engines.events_dead_end_for_stages(
            stage_run_ids=[run.pk for run in open_runs if run.engine_type],
            reason=f"its job ended ({status})",
        )
    message = f"job {status}"
    if error:
        message += f": {error.get('code')}: {error.get('message')}"
    if job.cancel_reason and status == JobStatus.CANCELLED:
        message += f" ({job.cancel_reason})"
    if status != JobStatus.COMPLETED:  # a completion is on the job row; keep the log for news
        _log(job, message, level="error" if status == JobStatus.FAILED else "info")
    if job.awaited:  # (read under the job's lock: a waiter marks it before it reads)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [JOB_DONE_CHANNEL, str(job.pk)])
    if job.parent_id:
        _batch_child_finished(parent_id=job.parent_id, now=now)


def _time_out(job: Job, now: datetime, message: str, *, stage: str = "") -> None:
    """End `job` `timed_out` (seed 003's TIMEOUT), its unfinished stages with it."""
    error = {"code": FailureCode.TIMEOUT, "message": message, **({"stage": stage} if stage else {})}
    _finish_job(job, JobStatus.TIMED_OUT, now=now, error=error, stage_status=StageStatus.TIMED_OUT)


def _expire_if_queue_timed_out(job: Job, now: datetime) -> bool:
    """Seed 003's TIMEOUT: a job not started within queue_timeout_s ends `timed_out`."""
    if (
        job.started_at is not None
        or not job.queue_timeout_s
        or job.pending_since is None
        or now <= job.pending_since + timedelta(seconds=job.queue_timeout_s)
    ):
        return False
    _time_out(job, now, f"Not started within queue_timeout_s ({job.queue_timeout_s} s).")
    return True


def _batch_reopen(*, parent_id: Any, now: datetime) -> None:
    """A child of an ended batch runs again (retried): the batch is running again, its
    outcome to be settled anew when its last child ends. Locked after the child, as
    every child transition locks its batch."""
    parent = Job.objects.select_for_update().filter(pk=parent_id).first()
    if parent is None or not parent.is_finished:
        return
    parent.status = JobStatus.RUNNING
    parent.finished_at = None
    parent.result = None
    parent.error = None
    parent.cancel_requested_at = None
    parent.cancel_reason = ""
    parent.save(
        update_fields=[
            "status", "finished_at", "result", "error", "cancel_requested_at",
            "cancel_reason", "updated_at",
        ]
    )  # fmt: skip
    _log(parent, "reopened: a child was retried")
    _batch_child_finished(parent_id=parent.pk, now=now)  # its progress, and the news


def _batch_child_finished(*, parent_id: Any, now: datetime) -> None:
    parent = Job.objects.select_for_update().filter(pk=parent_id).first()
    if parent is None or parent.is_finished:
        return
    children = list(parent.children.order_by("created_at", "id"))
    done = [child for child in children if child.is_finished]
    parent.progress = round(100.0 * len(done) / len(children), 2) if children else 100.0
    if len(done) < len(children):
        parent.save(update_fields=["progress", "updated_at"])
        _job_changed(parent, "job:progress")
        return
    results = [
        {"job": str(child.pk), "pipeline": child.pipeline, "result": child.result}
        for child in children
        if child.status == JobStatus.COMPLETED
    ]
    errors = [
        {
            "job": str(child.pk),
            "pipeline": child.pipeline,
            "status": child.status,
            "error": child.error,
        }
        for child in children
        if child.status != JobStatus.COMPLETED
    ]
    result = {"results": results, "errors": errors, "total": len(children)}
    if parent.cancel_requested_at:
        _finish_job(parent, JobStatus.CANCELLED, now=now, result=result)
    elif children and not results:
        error = {"code": FailureCode.BATCH_FAILED, "message": "Every item of the batch failed."}
        _finish_job(parent, JobStatus.FAILED, now=now, result=result, error=error)
    else:
        _finish_job(parent, JobStatus.COMPLETED, now=now, result=result)


# --- saturation ------------------------------------------------------------------------------

_depth_cache: dict[str, tuple[float, int]] = {}


def queue_depths_forget() -> None:
    """Drop the cached depths, so the next guard counts (tests and benchmarks that fill a
    queue and then submit again)."""
    _depth_cache.clear()


def queue_depth(queue: str) -> int:
    return QueueTask.objects.filter(queue=queue).count()


def queue_guard(queues: set[str]) -> None:
    """Refuse new work for a queue whose backlog passed OMNIVA_QUEUE_LIMIT (503, Retry-After).

    The depth is cached per process for a second: the limit is a pressure valve, and
    counting a deep backlog on every submission would itself add to the pressure.
    """
    limit = settings.OMNIVA_QUEUE_LIMIT
    now = time.monotonic()
    for queue in sorted(queues):
        cached = _depth_cache.get(queue)
        if cached is None or now - cached[0] > SATURATION_CACHE_S:
            cached = (now, queue_depth(queue))
            _depth_cache[queue] = cached
        if cached[1] >= limit:
            raise OmnivaError(
                ErrorCode.QUEUE_SATURATED,
                f"Queue {queue!r} has {cached[1]} tasks waiting (limit {limit}); retry later.",
                retry_after_s=5,
                details={"queue": queue, "depth": cached[1], "limit": limit},
            )


def json_column(value: Any) -> Any:
    # Django's psycopg setup hands jsonb to raw cursors as text (JSONField decodes it).
    return json.loads(value) if isinstance(value, str) else value


# A stage's inputs: its parents' outputs, by the (job, name) key. Prepared: every stage
# of a DAG but its roots reads them in its worker, and planning was most of its time.
PARENT_OUTPUTS_SQL = """
SELECT r.name, r.output FROM jobs_stagerun r
WHERE r.job_id = %(job)s AND r.name = ANY(%(parents)s::text[])
"""


def _parent_outputs(job_id: Any, pipeline: str, params: dict[str, Any], stage: str) -> dict:
    parents = pipeline_named(pipeline).dag(params).stage(stage).depends_on
    if not parents:
        return {}
    with prepared_cursor() as cursor:
        cursor.execute(PARENT_OUTPUTS_SQL, {"job": job_id, "parents": list(parents)})
        return {name: json_column(output) for name, output in cursor.fetchall()}


def _engine_deadline(job: Job) -> datetime | None:
    """When the job's engine stages must be done: the job's deadline (`_deadline`) once it
    started. Before that no engine has taken it, and nothing else bounds its wait: it
    waits at most timeout_s (or queue_timeout_s, if sooner) from when it was queued."""
    if job.started_at is not None:
        return _deadline(job)
    limits = [limit for limit in (job.timeout_s, job.queue_timeout_s) if limit]
    if not limits or job.pending_since is None:
        return None
    return job.pending_since + timedelta(seconds=min(limits))
