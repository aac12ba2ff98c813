"""The orchestrator: every transition of a job and its stage runs, one function each.

Each function runs in one transaction and locks the job row first (SELECT … FOR
UPDATE), so the transitions of one job are serialized whichever process makes them:
two parallel stages completing at once cannot both miss that the job is done. Lock
order is child job before batch parent, never the reverse.

Enqueueing is an INSERT into the broker's table in the same transaction, and the
NOTIFYs (queue wake-ups, job finished) are transactional too: a task or a wake-up
exists exactly when the transition that made it committed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import Avg, Count, Max
from django.utils import timezone
from django_q.signing import SignedPackage

from engines import services as engines
from jobs import broker, pipelines
from jobs.models import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    RETRYABLE_STATUSES,
    GpuWorkerReport,
    Job,
    JobLog,
    JobStatus,
    MetricCursor,
    MetricTally,
    QueueTask,
    StageRun,
    StageStatus,
)
from omniva import media
from omniva import services as core_services
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Project
from omniva.rows import ModelRows

logger = logging.getLogger("omniva.jobs")

JOB_DONE_CHANNEL = "omniva_job_done"
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


# --- activity (the live stream's outbox, omniva.models.Activity) -------------------------
# A job's and a stage run's state as a live client sees it. The one-statement transitions
# build the same objects in SQL (START_SQL, COMPLETE_SOLE_STAGE_SQL): keep them alike
# (tests/jobs/test_activity.py compares them).


def _job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.pk,
        "pipeline": job.pipeline,
        "status": job.status,
        "progress": job.progress,
        "priority": job.priority,
        "project_id": job.project_id,
        "attempts": job.attempts,
        "error": job.error,
        "updated_at": job.updated_at,
    }


def _stage_summary(run: StageRun) -> dict[str, Any]:
    return {
        "job_id": run.job_id,
        "id": run.pk,
        "name": run.name,
        "status": run.status,
        "attempt": run.attempt,
        "progress": run.progress,
        "worker": run.worker,
        "error": run.error,
    }


def _activity_row(kind: str, job: Job, data: dict[str, Any]) -> core_services.ActivityRow:
    return core_services.ActivityRow(kind=kind, data=data, job_id=job.pk, project_id=job.project_id)


def _activity(kind: str, job: Job, data: dict[str, Any]) -> None:
    core_services.activity_records([_activity_row(kind, job, data)])


def _job_changed(job: Job, kind: str = "job:update") -> None:
    _activity(kind, job, _job_summary(job))


def _stage_changed(job: Job, run: StageRun) -> None:
    _activity("stage:update", job, _stage_summary(run))


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


def task_payload(*, run: StageRun, job: Job, queue: str) -> str:
    """The signed django-q2 task that runs one stage: `jobs.tasks.run_stage(run.id)`."""
    return SignedPackage.dumps(
        {
            "id": uuid.uuid4().hex,
            "name": f"{job.pipeline}.{run.name}:{run.pk}",
            "func": "jobs.tasks.run_stage",
            "args": (run.pk,),
            "kwargs": {},
            "started": timezone.now(),
            "save": False,
            "cluster": queue,
        }
    )


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
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [JOB_DONE_CHANNEL, str(job.pk)])
    if job.parent_id:
        _batch_child_finished(parent_id=job.parent_id, now=now)


def _time_out(job: Job, now: datetime, message: str, *, stage: str = "") -> None:
    """End `job` `timed_out` (seed 003's TIMEOUT), its unfinished stages with it."""
    error = {"code": "TIMEOUT", "message": message, **({"stage": stage} if stage else {})}
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
        error = {"code": "BATCH_FAILED", "message": "Every item of the batch failed."}
        _finish_job(parent, JobStatus.FAILED, now=now, result=result, error=error)
    else:
        _finish_job(parent, JobStatus.COMPLETED, now=now, result=result)


# --- saturation ------------------------------------------------------------------------------

_depth_cache: dict[str, tuple[float, int]] = {}


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


# --- submit ----------------------------------------------------------------------------------


def parse_priority(value: Any) -> int:
    from jobs.models import PRIORITY_WORDS

    if isinstance(value, str) and value.strip().lower() in PRIORITY_WORDS:
        return PRIORITY_WORDS[value.strip().lower()]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            "priority is 0-10 or one of low, normal, high, urgent.",
            details={"priority": ["0-10 or low, normal, high, urgent"]},
        )
    return value


def job_submit(
    *,
    pipeline: str,
    params: dict[str, Any] | None = None,
    priority: int = 5,
    max_retries: int | None = None,
    timeout_s: int | None = None,
    queue_timeout_s: int | None = None,
    project: Project | None = None,
    idempotency_key: str | None = None,
    parent: Job | None = None,
) -> tuple[Job, bool]:
    """Create a job and enqueue its root stages; (job, created). A known idempotency key
    returns the job it first created, never a second one."""
    definition = pipeline_named(pipeline)
    params = {} if params is None else params
    errors = definition.validation_errors(params)
    if errors:
        raise OmnivaError(ErrorCode.VALIDATION_ERROR, "The params are not valid.", details=errors)
    if idempotency_key:
        existing = Job.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing, False
    dag = definition.dag(params)
    queue_guard({dag.stage(name).queue for name in dag.roots() if not dag.stage(name).engine_type})
    now = timezone.now()
    job = Job(
        pipeline=pipeline,
        params=params,
        priority=parse_priority(priority),
        max_retries=settings.OMNIVA_MAX_RETRIES if max_retries is None else max_retries,
        timeout_s=timeout_s if timeout_s is not None else settings.OMNIVA_JOB_TIMEOUT_S,
        queue_timeout_s=queue_timeout_s
        if queue_timeout_s is not None
        else settings.OMNIVA_QUEUE_TIMEOUT_S,
        project=project,
        idempotency_key=idempotency_key or None,
        parent=parent,
        pending_since=now,
    )
    roots = set(dag.roots())
    runs = [
        StageRun(
            job=job,
            name=stage.name,
            position=position,
            queue="" if stage.engine_type else stage.queue,
            engine_type=stage.engine_type or "",
            status=StageStatus.QUEUED if stage.name in roots else StageStatus.WAITING,
            queued_at=now if stage.name in roots else None,
        )
        for position, stage in enumerate(dag.stages)
    ]
    engine_roots = [run for run in runs if run.name in roots and run.engine_type]
    # The job, its stages, their activity rows and the tasks of its queued stages are one
    # statement, atomic by itself; a transaction only where more follows (events for
    # engine stages) or where the caller has one (a batch: a savepoint, as before).
    atomic = bool(engine_roots) or connection.in_atomic_block
    try:
        with transaction.atomic() if atomic else contextlib.nullcontext():
            _job_insert(job, runs, [run for run in runs if run.name in roots])
            for run in engine_roots:
                _enqueue_stage(job, run, dag.stage(run.name), saved=True)
    except IntegrityError:
        if idempotency_key:
            existing = Job.objects.filter(idempotency_key=idempotency_key).first()
            if existing is not None:
                return existing, False
        raise
    # The response renders the job as created, with its stages, without reading it back
    # (`stage_list`, as job_for_caller reads it).
    job.stage_list = runs
    return job, True


_JOB_ROWS = ModelRows(Job)
_STAGE_ROWS = ModelRows(StageRun)
_STAGE_IDS_SQL = (
    "SELECT nextval(pg_get_serial_sequence('jobs_stagerun', 'id')) FROM generate_series(1, %s)"
)
_JOB_INSERT_SQL = (
    "WITH job AS (INSERT INTO jobs_job ({job_columns}) VALUES {job}),"
    " stages AS (INSERT INTO jobs_stagerun ({stage_columns}) VALUES {stages}),"
    " activity AS (INSERT INTO omniva_activity ({activity_columns}) VALUES {activity})"
    "{tasks} SELECT {notify}"
)
_TASKS_INSERT_SQL = ", tasks AS (INSERT INTO jobs_queuetask ({columns}) VALUES {tasks})"


def _job_insert(job: Job, runs: list[StageRun], queued: list[StageRun]) -> None:
    """Insert a new job with its stages, the activity rows of the job and of its queued
    stages, and the tasks of those on a queue, in one statement (engine stages' events
    are the caller's). The ORM took five round trips and compiled four of them; this
    takes two: the stages' ids (each task carries its stage's), then the rest."""
    with connection.cursor() as cursor:
        cursor.execute(_STAGE_IDS_SQL, [len(runs)])
        for run, (stage_id,) in zip(runs, cursor.fetchall(), strict=True):
            run.pk = stage_id
        job_values, params = _JOB_ROWS.insert_values([job])
        stage_values, stage_params = _STAGE_ROWS.insert_values(runs)
        activity_values, activity_params = core_services.activity_values(
            [
                _activity_row("job:update", job, _job_summary(job)),
                *(_activity_row("stage:update", job, _stage_summary(run)) for run in queued),
            ]
        )
        params += stage_params + activity_params
        tasks = ""
        on_queues = [run for run in queued if not run.engine_type]
        if on_queues:
            tasks = _TASKS_INSERT_SQL.format(
                columns=broker.ENQUEUE_COLUMNS,
                tasks=", ".join([broker.ENQUEUE_VALUES] * len(on_queues)),
            )
            for run in on_queues:
                params += broker.enqueue_values(
                    queue=run.queue,
                    payload=task_payload(run=run, job=job, queue=run.queue),
                    priority=job.priority,
                    stage_run_id=run.pk,
                )
        channels = [
            core_services.ACTIVITY_CHANNEL,
            *sorted({broker.channel_for(run.queue) for run in on_queues}),
        ]
        sql = _JOB_INSERT_SQL.format(
            job_columns=_JOB_ROWS.columns,
            job=job_values,
            stage_columns=_STAGE_ROWS.columns,
            stages=stage_values,
            activity_columns=core_services.ACTIVITY_COLUMNS,
            activity=activity_values,
            tasks=tasks,
            notify=", ".join(["pg_notify(%s, '')"] * len(channels)),
        )
        cursor.execute(sql, params + channels)


def job_submit_batch(
    *,
    items: list[dict[str, Any]],
    priority: int | None = None,
    max_retries: int | None = None,
    project: Project | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """A parent job whose children run independently; it ends when all of them have."""
    if idempotency_key:
        existing = Job.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing, False
    batch_priority = 5 if priority is None else parse_priority(priority)
    now = timezone.now()
    try:
        with transaction.atomic():
            parent = Job.objects.create(
                pipeline=BATCH_PIPELINE,
                params={"items": len(items)},
                priority=batch_priority,
                status=JobStatus.RUNNING,
                max_retries=settings.OMNIVA_MAX_RETRIES if max_retries is None else max_retries,
                project=project,
                idempotency_key=idempotency_key or None,
                pending_since=now,
                started_at=now,
            )
            for index, item in enumerate(items):
                try:
                    job_submit(
                        pipeline=item["pipeline"],
                        params=item.get("params") or {},
                        priority=item.get("priority", batch_priority),
                        max_retries=parent.max_retries,
                        project=project,
                        parent=parent,
                    )
                except OmnivaError as exc:
                    raise OmnivaError(
                        exc.code,
                        f"items[{index}]: {exc.message}",
                        details={f"items.{index}": exc.details or exc.message},
                        retry_after_s=exc.retry_after_s,
                    ) from None
            _log(parent, f"batch of {len(items)} jobs submitted")
            _job_changed(parent)
    except IntegrityError:
        if idempotency_key:
            existing = Job.objects.filter(idempotency_key=idempotency_key).first()
            if existing is not None:
                return existing, False
        raise
    return parent, True


# --- stage transitions (called by workers) ---------------------------------------------------


def stage_start(*, stage_run_id: int, worker: str, ack_id: str | None = None) -> StageClaim | None:
    """Grant one attempt of a queued stage to `worker`, or None when it must not run.

    A stage still `running` whose lease ran out belongs to a worker that died: that
    attempt counts as failed, and this delivery is the next attempt if one is left.
    """
    started = stages_start_granted(ack_ids={stage_run_id: ack_id}, worker=worker)
    if started:
        return started[0]
    with transaction.atomic():
        locked = _lock_job_of_stage(stage_run_id)
        if locked is None:
            return None
        job, run = locked
        now = timezone.now()
        if job.is_finished:
            return None
        if ack_id and not broker.delivery_is_current(ack_id=ack_id):
            return None  # a row of an ended attempt, or one delivered again since
        if job.cancel_requested_at:
            _finish_job(job, JobStatus.CANCELLED, now=now)
            return None
        if _expire_if_queue_timed_out(job, now):
            return None
        deadline = _deadline(job)
        if deadline and now >= deadline:
            _time_out(job, now, f"Ran past timeout_s ({job.timeout_s} s).")
            return None
        if run.status == StageStatus.RUNNING:
            if run.lease_expires_at and run.lease_expires_at > now:
                # The attempt's lease has not quite run out (the row's lease started a
                # moment before it, at the claim): look again when it has.
                if ack_id:
                    broker.defer_delivery(
                        ack_id=ack_id, until=run.lease_expires_at + timedelta(milliseconds=50)
                    )
                return None
            lost = {
                "code": "WORKER_LOST",
                "message": f"The worker running attempt {run.attempt} stopped responding.",
                "stage": run.name,
            }
            _log(job, lost["message"], stage=run.name, level="warning")
            if run.attempt - run.attempt_floor > job.max_retries:
                run.status = StageStatus.FAILED
                run.error = lost
                run.finished_at = now
                run.save()
                _finish_job(job, JobStatus.FAILED, now=now, error=lost)
                return None
        elif run.status != StageStatus.QUEUED:
            return None
        run.attempt += 1
        run.status = StageStatus.RUNNING
        run.lease_token = uuid.uuid4()
        run.lease_expires_at = _lease_until(now)
        run.worker = worker[:200]
        run.started_at = now
        run.finished_at = None
        run.progress = 0.0
        run.error = None
        fields = ["attempt", "status", "lease_token", "lease_expires_at", "worker", "started_at"]
        run.save(update_fields=[*fields, "finished_at", "progress", "error"])
        job.attempts = max(job.attempts, run.attempt)
        job.status = JobStatus.RUNNING
        job.next_attempt_at = None
        if job.started_at is None:
            job.started_at = now
        job.save(
            update_fields=["attempts", "status", "next_attempt_at", "started_at", "updated_at"]
        )
        _job_changed(job)
        _stage_changed(job, run)
        return StageClaim(
            stage_run_id=run.pk,
            job_id=str(job.pk),
            pipeline=job.pipeline,
            stage=run.name,
            attempt=run.attempt,
            token=str(run.lease_token),
            params=job.params,
            inputs=_parent_outputs(job.pk, job.pipeline, job.params, run.name),
            deadline=_deadline(job),
            ack_id=ack_id,
        )


def _parent_outputs(job_id: Any, pipeline: str, params: dict[str, Any], stage: str) -> dict:
    parents = pipeline_named(pipeline).dag(params).stage(stage).depends_on
    if not parents:
        return {}
    runs = StageRun.objects.filter(job_id=job_id, name__in=parents)
    return dict(runs.values_list("name", "output"))


# The common case of a start in one statement, as a queue's claim is: a queued stage of
# a job that is neither finished, cancelled nor out of time. It locks the job row first
# like every transition; the stage run is only changed while its status is still
# `queued` (re-checked on the newest row version once the lock is held), and only by a
# delivery whose queue row is still there as delivered: a row that ended with an
# earlier attempt (dropped with it) or was delivered again since starts nothing. When
# any of that does not hold it changes nothing, and stage_start decides under the full
# rules.
START_SQL = """
WITH given AS (
    SELECT * FROM unnest(%(runs)s::bigint[], %(rows)s::bigint[], %(deliveries)s::int[])
           AS g(run_id, row_id, deliveries)
), target AS (
    SELECT r.id AS run_id
    FROM jobs_stagerun r JOIN jobs_job j ON j.id = r.job_id
    JOIN given g ON g.run_id = r.id
    -- r.id = ANY: the run's primary key drives the plan (unnest's row estimate does not)
    WHERE r.id = ANY(%(runs)s) AND r.status = %(queued)s
      AND (g.row_id IS NULL OR EXISTS (
          SELECT 1 FROM jobs_queuetask q WHERE q.id = g.row_id AND q.deliveries = g.deliveries))
      AND j.status <> ALL(%(finished)s) AND j.cancel_requested_at IS NULL
      AND (j.started_at IS NOT NULL OR COALESCE(j.queue_timeout_s, 0) = 0
           OR j.pending_since IS NULL
           OR %(now)s <= j.pending_since + make_interval(secs => j.queue_timeout_s))
      AND (COALESCE(j.timeout_s, 0) = 0 OR j.started_at IS NULL
           OR %(now)s < j.started_at + make_interval(secs => j.timeout_s))
    ORDER BY j.id
    FOR UPDATE OF j
), run AS (
    UPDATE jobs_stagerun r
    SET status = %(running)s, attempt = r.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = %(lease)s, worker = %(worker)s, started_at = %(now)s,
        finished_at = NULL, progress = 0, error = NULL
    FROM target
    WHERE r.id = target.run_id AND r.status = %(queued)s
    RETURNING r.*
), job AS (
    UPDATE jobs_job j
    SET status = %(running)s, attempts = GREATEST(j.attempts, run.attempt),
        next_attempt_at = NULL, started_at = COALESCE(j.started_at, %(now)s),
        updated_at = %(now)s
    FROM run
    WHERE j.id = run.job_id
    RETURNING j.*
), activity AS (
    INSERT INTO omniva_activity (at, kind, project_id, job_id, data)
    SELECT %(now)s, 'job:update', job.project_id, job.id,
        jsonb_build_object(
            'id', job.id, 'pipeline', job.pipeline, 'status', job.status,
            'progress', job.progress, 'priority', job.priority, 'project_id', job.project_id,
            'attempts', job.attempts, 'error', job.error, 'updated_at', job.updated_at)
    FROM job
    UNION ALL
    SELECT %(now)s, 'stage:update', job.project_id, job.id,
        jsonb_build_object(
            'job_id', run.job_id, 'id', run.id, 'name', run.name, 'status', run.status,
            'attempt', run.attempt, 'progress', run.progress, 'worker', run.worker,
            'error', run.error)
    FROM job JOIN run ON run.job_id = job.id
)
SELECT run.id, run.lease_token, job.id, job.pipeline, job.params, job.started_at,
       job.timeout_s, run.name, run.attempt, pg_notify(%(activity_channel)s, '')
FROM job JOIN run ON run.job_id = job.id
"""


def stages_start_granted(*, ack_ids: dict[int, str | None], worker: str) -> list[StageClaim]:
    """The common starts of many stage runs (`ack_ids`: run id -> its delivery) in one
    statement (START_SQL); the runs it did not start are for stage_start to decide."""
    if not ack_ids:
        return []
    now = timezone.now()
    deliveries = [broker.parse_ack_id(ack) if ack else (None, None) for ack in ack_ids.values()]
    with connection.cursor() as cursor:
        cursor.execute(
            START_SQL,
            {
                "runs": list(ack_ids),
                "rows": [row for row, _ in deliveries],
                "deliveries": [count for _, count in deliveries],
                "queued": StageStatus.QUEUED,
                "running": StageStatus.RUNNING,
                "finished": list(FINISHED_STATUSES),
                "now": now,
                "lease": _lease_until(now),
                "worker": worker[:200],
                "activity_channel": core_services.ACTIVITY_CHANNEL,
            },
        )
        rows = cursor.fetchall()
    claims = []
    for run_id, token, job_id, pipeline, params, started_at, timeout_s, stage, attempt, _ in rows:
        params = _json_column(params)
        claims.append(
            StageClaim(
                stage_run_id=run_id,
                job_id=str(job_id),
                pipeline=pipeline,
                stage=stage,
                attempt=attempt,
                token=str(token),
                params=params,
                inputs=_parent_outputs(job_id, pipeline, params, stage),
                deadline=started_at + timedelta(seconds=timeout_s) if timeout_s else None,
                ack_id=ack_ids[run_id],
            )
        )
    return claims


def _json_column(value: Any) -> Any:
    # Django's psycopg setup hands jsonb to raw cursors as text (JSONField decodes it).
    return json.loads(value) if isinstance(value, str) else value


def _held_run(stage_run_id: int, token: str) -> tuple[Job, StageRun]:
    """Lock the job of a running stage whose lease `token` still holds, or raise."""
    locked = _lock_job_of_stage(stage_run_id)
    if locked is None:
        raise OmnivaError(ErrorCode.STAGE_LEASE_LOST, "The stage run no longer exists.")
    job, run = locked
    if run.status != StageStatus.RUNNING or str(run.lease_token) != str(token):
        raise OmnivaError(
            ErrorCode.STAGE_LEASE_LOST,
            f"Attempt token of {job.pipeline}.{run.name} is stale; the result is dropped.",
        )
    return job, run


def stage_report(
    *,
    stage_run_id: int,
    token: str,
    progress: float | None = None,
    message: str | None = None,
    level: str = "info",
) -> None:
    """A checkpoint: record progress and a log line, extend the lease, and raise
    StageInterrupted when the attempt must stop (cancelled, timed out, lease lost)."""
    from jobs.stages import StageCancelled, StageLeaseLost, StageTimedOut

    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            raise StageLeaseLost() from None
        now = timezone.now()
        if job.is_finished:
            raise StageLeaseLost()  # ended by someone else: nothing of this attempt is kept
        if job.cancel_requested_at:
            raise StageCancelled()
        deadline = _deadline(job)
        if deadline and now >= deadline:
            raise StageTimedOut()
        fields = ["lease_expires_at"]
        run.lease_expires_at = _lease_until(now)
        if progress is not None:
            run.progress = progress
            fields.append("progress")
        run.save(update_fields=fields)
        if progress is not None:
            _update_progress(job)
            job.save(update_fields=["progress", "updated_at"])
            _stage_changed(job, run)
            _job_changed(job, "job:progress")
        if message:
            _log(job, message, stage=run.name, level=level)


def stage_heartbeat(*, claim: StageClaim) -> SupervisionState:
    """Extend the attempt's lease and its queue row's; report a cancel or the deadline."""
    held = stages_heartbeat(claims=[claim])
    return held.get(claim.stage_run_id, SupervisionState(lease_held=False))


# The heartbeat of running attempts (one, or a gpu batch's), one statement: the leases
# of those whose tokens still hold are extended, and their jobs' state returned.
HEARTBEAT_SQL = """
UPDATE jobs_stagerun r SET lease_expires_at = %(lease)s
FROM unnest(%(runs)s::bigint[], %(tokens)s::uuid[]) AS g(run_id, token), jobs_job j
WHERE r.id = g.run_id AND r.lease_token = g.token AND r.status = %(running)s
  AND j.id = r.job_id
RETURNING r.id, j.status, j.cancel_requested_at, j.started_at, j.timeout_s
"""


def stages_heartbeat(*, claims: list[StageClaim]) -> dict[int, SupervisionState]:
    """The heartbeat of running attempts (a gpu batch's, while its forward pass runs):
    their leases and their queue rows' extended, one statement each, and what each one's
    job asks (a cancel, its deadline), by stage run id; an attempt whose token no longer
    holds is absent."""
    if not claims:
        return {}
    now = timezone.now()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                HEARTBEAT_SQL,
                {
                    "lease": _lease_until(now),
                    "runs": [claim.stage_run_id for claim in claims],
                    "tokens": [claim.token for claim in claims],
                    "running": StageStatus.RUNNING,
                },
            )
            rows = cursor.fetchall()
        broker.extend_leases(
            ack_ids=[claim.ack_id for claim in claims if claim.ack_id],
            lease_s=settings.OMNIVA_TASK_LEASE_S,
        )
    return {
        run_id: SupervisionState(
            lease_held=status not in FINISHED_STATUSES,
            cancel_requested_at=cancel_requested_at,
            deadline=started_at + timedelta(seconds=timeout_s)
            if timeout_s and started_at
            else None,
        )
        for run_id, status, cancel_requested_at, started_at, timeout_s in rows
    }


def _drop_queue_rows(run: StageRun) -> None:
    """The attempt ended: every queue row of its run goes, in the transition's own
    transaction (one commit fewer than django-q2's acknowledgement after the task
    returned, and never one without the other). Every row, not only this delivery's: a
    row delivered again while its first delivery waited in a worker's buffer is the same
    run's, and left behind it would start the retry before its backoff."""
    broker.drop_stage_tasks(stage_run_ids=[run.pk])


# The common completion in one statement: the only stage of a one-stage pipeline
# (pipelines.single_stage_pipelines) completes with its job, its queue rows are dropped
# and the job-done NOTIFY sent. Under the job's row lock like every
# transition, and only while the attempt's token holds; otherwise it changes nothing and
# stage_complete decides under the full rules (cancel requested, batch parent, DAGs).
COMPLETE_SOLE_STAGE_SQL = """
WITH given AS (
    SELECT * FROM unnest(%(runs)s::bigint[], %(tokens)s::uuid[], %(outputs)s::text[])
           AS g(run_id, token, output)
), target AS (
    SELECT r.id AS run_id
    FROM jobs_stagerun r JOIN jobs_job j ON j.id = r.job_id
    JOIN given g ON g.run_id = r.id AND g.token = r.lease_token
    -- r.id = ANY: the run's primary key drives the plan (unnest's row estimate does not)
    WHERE r.id = ANY(%(runs)s) AND r.status = %(running)s
      AND j.status <> ALL(%(finished)s) AND j.cancel_requested_at IS NULL
      AND j.parent_id IS NULL AND j.pipeline = ANY(%(pipelines)s)
    ORDER BY j.id
    FOR UPDATE OF j
), run AS (
    UPDATE jobs_stagerun r
    SET status = %(completed)s, output = g.output::jsonb, progress = 100,
        finished_at = %(now)s, lease_token = NULL, lease_expires_at = NULL, error = NULL
    FROM target JOIN given g ON g.run_id = target.run_id
    WHERE r.id = target.run_id AND r.status = %(running)s AND r.lease_token = g.token
    RETURNING r.*
), dropped AS (
    DELETE FROM jobs_queuetask q USING run WHERE q.stage_run_id = run.id
), job AS (
    UPDATE jobs_job j
    SET status = %(completed)s, result = run.output, error = NULL, progress = 100,
        finished_at = %(now)s, next_attempt_at = NULL, updated_at = %(now)s
    FROM run
    WHERE j.id = run.job_id
    RETURNING j.*
), activity AS (
    INSERT INTO omniva_activity (at, kind, project_id, job_id, data)
    SELECT %(now)s, 'stage:update', job.project_id, job.id,
        jsonb_build_object(
            'job_id', run.job_id, 'id', run.id, 'name', run.name, 'status', run.status,
            'attempt', run.attempt, 'progress', run.progress, 'worker', run.worker,
            'error', run.error)
    FROM job JOIN run ON run.job_id = job.id
    UNION ALL
    SELECT %(now)s, 'job:update', job.project_id, job.id,
        jsonb_build_object(
            'id', job.id, 'pipeline', job.pipeline, 'status', job.status,
            'progress', job.progress, 'priority', job.priority, 'project_id', job.project_id,
            'attempts', job.attempts, 'error', job.error, 'updated_at', job.updated_at)
    FROM job
)
SELECT run.id, pg_notify(%(channel)s, job.id::text), pg_notify(%(activity_channel)s, '')
FROM job JOIN run ON run.job_id = job.id
"""


@dataclass(frozen=True)
class Completion:
    stage_run_id: int
    token: str
    output: Any


def stages_complete_sole(completions: list[Completion]) -> set[int]:
    """Complete many one-stage jobs with their stage in one statement
    (COMPLETE_SOLE_STAGE_SQL): the ids of the runs it completed; the others are for
    stage_complete to decide. What JSON cannot hold raises before anything is written."""
    if not completions:
        return set()
    with connection.cursor() as cursor:
        cursor.execute(
            COMPLETE_SOLE_STAGE_SQL,
            {
                "runs": [c.stage_run_id for c in completions],
                "tokens": [c.token for c in completions],
                "outputs": [json.dumps(c.output, allow_nan=False) for c in completions],
                "running": StageStatus.RUNNING,
                "completed": StageStatus.COMPLETED,
                "finished": list(FINISHED_STATUSES),
                "pipelines": pipelines.single_stage_pipelines(),
                "now": timezone.now(),
                "channel": JOB_DONE_CHANNEL,
                "activity_channel": core_services.ACTIVITY_CHANNEL,
            },
        )
        return {row[0] for row in cursor.fetchall()}


def stage_complete(*, stage_run_id: int, token: str, output: Any) -> None:
    """Store the output; start every child whose parents all completed; finish the job
    when every stage has. A stale token changes nothing (STAGE_LEASE_LOST)."""
    if stages_complete_sole([Completion(stage_run_id, token, output)]):
        return
    with transaction.atomic():
        job, run = _held_run(stage_run_id, token)
        now = timezone.now()
        if job.is_finished:
            raise OmnivaError(ErrorCode.STAGE_LEASE_LOST, "The job already ended.")
        run.status = StageStatus.COMPLETED
        run.output = output
        run.progress = 100.0
        run.finished_at = now
        run.lease_token = None
        run.lease_expires_at = None
        run.error = None
        run.save(
            update_fields=[
                "status",
                "output",
                "progress",
                "finished_at",
                "lease_token",
                "lease_expires_at",
                "error",
            ]
        )
        _drop_queue_rows(run)
        _stage_changed(job, run)
        if job.cancel_requested_at:
            _finish_job(job, JobStatus.CANCELLED, now=now)
            return
        definition = pipeline_named(job.pipeline)
        dag = definition.dag(job.params)
        others = StageRun.objects.filter(job=job).exclude(pk=run.pk) if len(dag.order) > 1 else []
        runs = {r.name: r for r in others}
        runs[run.name] = run
        if all(r.status == StageStatus.COMPLETED for r in runs.values()):
            outputs = {name: r.output for name, r in runs.items()}
            result = definition.result(outputs, dag)
            _finish_job(job, JobStatus.COMPLETED, now=now, result=result, runs=list(runs.values()))
            return
        for child in dag.children(run.name):
            child_run = runs[child]
            if child_run.status != StageStatus.WAITING:
                continue
            if all(runs[p].status == StageStatus.COMPLETED for p in dag.stage(child).depends_on):
                _enqueue_stage(job, child_run, dag.stage(child))
        _update_progress(job)
        job.save(update_fields=["progress", "updated_at"])
        _job_changed(job, "job:progress")
        return


def stage_fail(
    *,
    stage_run_id: int,
    token: str,
    code: str,
    message: str,
    retryable: bool = True,
) -> Job:
    """A failed attempt: retry after the backoff while retries are left, else fail the job."""
    with transaction.atomic():
        job, run = _held_run(stage_run_id, token)
        now = timezone.now()
        if job.is_finished:
            raise OmnivaError(ErrorCode.STAGE_LEASE_LOST, "The job already ended.")
        # The run's row is written before its queue rows go, the order a heartbeat
        # takes them in (stage run, then queue row).
        error = {"code": code, "message": message[:2000], "stage": run.name, "attempt": run.attempt}
        run.error = error
        run.lease_token = None
        run.lease_expires_at = None
        if job.cancel_requested_at:
            run.status = StageStatus.CANCELLED
            run.finished_at = now
            run.save()
            _finish_job(job, JobStatus.CANCELLED, now=now)  # drops the run's rows
            return job
        retries_used = run.attempt - run.attempt_floor
        if retryable and retries_used <= job.max_retries:
            delay = engines.retry_backoff_s(retries_used)
            run.save()
            _drop_queue_rows(run)
            _log(
                job,
                f"attempt {run.attempt} failed: {code}: {message[:500]}; retry in {delay} s",
                stage=run.name,
                level="warning",
            )
            _enqueue_stage(
                job,
                run,
                pipeline_named(job.pipeline).dag(job.params).stage(run.name),
                delay_s=delay,
            )
            job.status = JobStatus.RETRYING
            job.next_attempt_at = now + timedelta(seconds=delay)
            job.save(update_fields=["status", "next_attempt_at", "updated_at"])
            _job_changed(job)
            return job
        run.status = StageStatus.FAILED
        run.finished_at = now
        run.save()
        _drop_queue_rows(run)
        _stage_changed(job, run)
        _finish_job(
            job,
            JobStatus.FAILED,
            now=now,
            error={"code": code, "message": message[:2000], "stage": run.name},
        )
        return job


def stage_cancelled(*, stage_run_id: int, token: str) -> Job | None:
    """The stage stopped at a checkpoint because its job was cancelled."""
    with transaction.atomic():
        try:
            job, _run = _held_run(stage_run_id, token)
        except OmnivaError:
            return None
        if not job.is_finished:
            _finish_job(job, JobStatus.CANCELLED, now=timezone.now())
        return job


def stage_timed_out(*, stage_run_id: int, token: str) -> Job | None:
    """The stage ran past its job's timeout_s and was stopped."""
    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            return None
        if not job.is_finished:
            _time_out(
                job, timezone.now(), f"Ran past timeout_s ({job.timeout_s} s).", stage=run.name
            )
        return job


def stage_force_cancel(*, stage_run_id: int, token: str) -> bool:
    """The grace after a cancel ran out and the stage did not stop: end the job anyway,
    revoking the attempt's token so whatever it returns later is dropped."""
    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            return False
        if job.is_finished or not job.cancel_requested_at:
            return False
        _log(
            job,
            "stage did not stop within the cancel grace period; forced",
            stage=run.name,
            level="warning",
        )
        _finish_job(job, JobStatus.CANCELLED, now=timezone.now())
        return True


def stage_force_timeout(*, stage_run_id: int, token: str) -> bool:
    """The stage ran past the deadline and did not stop at the alarm: time the job out."""
    return stage_timed_out(stage_run_id=stage_run_id, token=token) is not None


def stage_release(*, stage_run_id: int, token: str, reason: str) -> Job | None:
    """Put a started attempt back in its queue, ready at once and not counted: it never
    had its turn (the gpu batch it was gathered into was stopped by another job's cancel,
    deadline or lost lease). Its attempt number is given back, so neither its retries
    nor `attempts` count it. A job cancelled meanwhile ends cancelled, one past its
    deadline times out; a stale token changes nothing (None)."""
    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            return None
        now = timezone.now()
        if job.is_finished:
            return job
        if job.cancel_requested_at:
            _finish_job(job, JobStatus.CANCELLED, now=now)
            return job
        deadline = _deadline(job)
        if deadline and now >= deadline:
            _time_out(job, now, f"Ran past timeout_s ({job.timeout_s} s).", stage=run.name)
            return job
        run.attempt -= 1
        run.status = StageStatus.QUEUED
        run.queued_at = now
        run.started_at = None
        run.lease_token = None
        run.lease_expires_at = None
        run.save(
            update_fields=[
                "attempt", "status", "queued_at", "started_at", "lease_token", "lease_expires_at",
            ]
        )  # fmt: skip
        # The fresh row below is the one delivery of the next attempt. The run's rows
        # are dropped after it is written, the order a heartbeat takes them in.
        _drop_queue_rows(run)
        _log(job, f"attempt {run.attempt + 1} released, not counted: {reason}", stage=run.name)
        _stage_changed(job, run)
        _enqueue_stage(
            job, run, pipeline_named(job.pipeline).dag(job.params).stage(run.name), saved=True
        )
        attempts = StageRun.objects.filter(job=job).aggregate(most=Max("attempt"))["most"]
        if attempts != job.attempts:
            job.attempts = attempts or 0
            job.save(update_fields=["attempts", "updated_at"])
            _job_changed(job)
        return job


# --- job transitions (called by users) -------------------------------------------------------


# --- stages that run on engines ------------------------------------------------------
# An engine stage is an Event (engines/); these are the orchestrator's side of its
# life, called by engines through the callbacks registered in jobs/apps.py. Its end goes
# through stage_complete / stage_fail like a worker stage's. The event's lease fences
# the engine; the stage run has no lease of its own (lease_expires_at stays empty), so
# a cancel ends it at once and dead-ends the event.
#
# No worker's alarm bounds an engine stage, so its deadline is derived: the event carries
# it (Event.deadline, `_engine_deadline`), the claim never hands it out past it, and a
# report, a claim of its engine type, a read of the job (job_expire_if_due) or the
# retention pass, whichever comes first, times the job out (stage_engine_expire).


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


def _expire_engine_job(job: Job, run: StageRun, now: datetime) -> bool:
    """Under the job's lock: time the job of engine stage `run` out if its deadline
    passed (its events are dead-ended with it); whether it did."""
    deadline = _engine_deadline(job)
    if deadline is None or now < deadline:
        return False
    if job.started_at is not None:
        message = f"Ran past timeout_s ({job.timeout_s} s)."
    elif job.queue_timeout_s and (not job.timeout_s or job.queue_timeout_s <= job.timeout_s):
        message = f"Not started within queue_timeout_s ({job.queue_timeout_s} s)."
    else:
        message = f"No {run.engine_type} engine took it within timeout_s ({job.timeout_s} s)."
    _time_out(job, now, message, stage=run.name)
    return True


def _mark_engine_stage_running(job: Job, run: StageRun, engine: str, now: datetime) -> None:
    starts_job = job.started_at is None
    run.attempt += 1
    run.worker = engine[:200]
    if run.status != StageStatus.RUNNING:
        run.status = StageStatus.RUNNING
        run.lease_token = uuid.uuid4()
        run.lease_expires_at = None
        run.started_at = now
        run.progress = 0.0
    run.save(
        update_fields=[
            "attempt",
            "worker",
            "status",
            "lease_token",
            "lease_expires_at",
            "started_at",
            "progress",
        ]
    )
    job.attempts = max(job.attempts, run.attempt)
    job.status = JobStatus.RUNNING
    job.next_attempt_at = None
    job.started_at = job.started_at or now
    job.save(update_fields=["attempts", "status", "next_attempt_at", "started_at", "updated_at"])
    _job_changed(job)
    _stage_changed(job, run)
    if starts_job:
        # Its events waited under the deadline of a job not started; now it runs under
        # the job's own (started_at + timeout_s).
        open_engine_runs = StageRun.objects.filter(
            job=job, status__in=[StageStatus.QUEUED, StageStatus.RUNNING]
        ).exclude(engine_type="")
        engines.events_deadline_set(
            stage_run_ids=list(open_engine_runs.values_list("pk", flat=True)),
            deadline=_deadline(job),
        )


def stage_engine_claimed(*, stage_run_id: int, engine: str) -> None:
    """An engine took the stage's event: the stage is running there."""
    with transaction.atomic():
        locked = _lock_job_of_stage(stage_run_id)
        if locked is None:
            return
        job, run = locked
        if job.is_finished or run.status not in (StageStatus.QUEUED, StageStatus.RUNNING):
            return
        now = timezone.now()
        if _expire_engine_job(job, run, now):
            return  # its event is dead-ended with the job; the engine's report is refused
        _mark_engine_stage_running(job, run, engine, now)


def stage_engine_expire(*, stage_run_id: int) -> bool:
    """The stage's event passed its deadline: True when its job ended (timed out now,
    which dead-ends the event, or before); False when the job still has time (a worker
    stage started it meanwhile), after moving the event's deadline to the job's."""
    with transaction.atomic():
        locked = _lock_job_of_stage(stage_run_id)
        if locked is None:
            return True
        job, run = locked
        if job.is_finished or run.status not in (StageStatus.QUEUED, StageStatus.RUNNING):
            return True
        if _expire_engine_job(job, run, timezone.now()):
            return True
        engines.events_deadline_set(stage_run_ids=[run.pk], deadline=_engine_deadline(job))
        return False


def stage_engine_progress(*, stage_run_id: int, progress: float) -> None:
    from jobs.stages import StageInterrupted

    run = StageRun.objects.filter(pk=stage_run_id, status=StageStatus.RUNNING).first()
    if run is None or run.lease_token is None:
        return
    with contextlib.suppress(StageInterrupted, OmnivaError):
        stage_report(stage_run_id=run.pk, token=str(run.lease_token), progress=progress)


def stage_engine_finished(
    *, stage_run_id: int, output: Any, error: dict[str, Any] | None, engine: str | None = None
) -> None:
    """The stage's event completed (`output`) or was dead-lettered (`error`: its retries
    are spent, so the job fails without more). Runs in the engine's transaction."""
    with transaction.atomic():
        locked = _lock_job_of_stage(stage_run_id)
        if locked is None:
            return
        job, run = locked
        if job.is_finished or run.status not in (StageStatus.QUEUED, StageStatus.RUNNING):
            return
        if run.status == StageStatus.QUEUED:  # the claim's own callback has not run yet
            _mark_engine_stage_running(job, run, engine or "engine", timezone.now())
        token = str(run.lease_token)
        if error is None:
            stage_complete(stage_run_id=run.pk, token=token, output=output)
        else:
            stage_fail(
                stage_run_id=run.pk,
                token=token,
                code=str(error.get("code") or "ENGINE_ERROR"),
                message=str(error.get("message") or ""),
                retryable=False,
            )


def job_cancel(*, job_id: Any, reason: str = "") -> tuple[Job, bool]:
    """Cancel a job: (job, finished_now). A job with a running stage is marked and stops at
    its next checkpoint (finished_now False); any other active job is cancelled at once."""
    with transaction.atomic():
        job = _lock_job(job_id)
        now = timezone.now()
        if job.is_finished:
            raise OmnivaError(
                ErrorCode.JOB_NOT_CANCELLABLE, f"Job {job.pk} already ended ({job.status})."
            )
        if not job.cancel_requested_at:
            job.cancel_requested_at = now
            job.cancel_reason = (reason or "cancelled by request")[:500]
            job.save(update_fields=["cancel_requested_at", "cancel_reason", "updated_at"])
            _log(job, f"cancel requested: {job.cancel_reason}")
            _job_changed(job)
        if job.pipeline != BATCH_PIPELINE:
            return _cancel_or_mark(job, now)
    return _batch_cancel(job, now)


def _cancel_or_mark(job: Job, now: datetime) -> tuple[Job, bool]:
    """Under the job's lock: cancelled now, or marked to stop at a running stage's next
    checkpoint (cancelled anyway once the grace ran out)."""
    running = StageRun.objects.filter(job=job, status=StageStatus.RUNNING)
    live = running.filter(lease_expires_at__gt=now)
    assert job.cancel_requested_at is not None
    overdue = now - job.cancel_requested_at >= _cancel_grace()
    if live.exists() and not overdue:
        return job, False
    _finish_job(job, JobStatus.CANCELLED, now=now)
    return job, True


def _batch_cancel(parent: Job, now: datetime) -> tuple[Job, bool]:
    """Cancel a batch's children, then settle the batch. A child that finishes locks its
    own row, then its parent's (`_batch_child_finished`): the one lock order is child,
    then parent. So the parent's lock is not held here while each child is cancelled,
    in a transaction of its own; the parent, marked `cancel_requested_at` already, ends
    `cancelled` once its last child has, whoever settles it."""
    active = parent.children.filter(status__in=ACTIVE_STATUSES).order_by("created_at", "id")
    for child_id in list(active.values_list("pk", flat=True)):
        job_cancel_child(child_id=child_id, reason=parent.cancel_reason)
    with transaction.atomic():
        _batch_child_finished(parent_id=parent.pk, now=now)
    parent.refresh_from_db()
    return parent, parent.is_finished


def job_cancel_child(*, child_id: Any, reason: str) -> None:
    with contextlib.suppress(OmnivaError):  # it ended meanwhile
        job_cancel(job_id=child_id, reason=reason)


def job_retry(*, job_id: Any) -> Job:
    """Run a failed, cancelled or timed-out job again: only the stages that did not
    complete run, with their retry allowance renewed."""
    with transaction.atomic():
        job = _lock_job(job_id)
        if job.status not in RETRYABLE_STATUSES:
            raise OmnivaError(
                ErrorCode.JOB_NOT_RETRYABLE,
                f"Job {job.pk} is {job.status}; only failed, cancelled or timed-out jobs retry.",
            )
        now = timezone.now()
        job.status = JobStatus.PENDING if job.pipeline != BATCH_PIPELINE else JobStatus.RUNNING
        job.error = None
        job.result = None
        job.finished_at = None
        job.cancel_requested_at = None
        job.cancel_reason = ""
        job.next_attempt_at = None
        job.pending_since = now
        job.started_at = now if job.pipeline == BATCH_PIPELINE else None
        job.save()
        _log(job, "retried by request")
        if job.pipeline == BATCH_PIPELINE:
            _job_changed(job)
            for child in job.children.filter(status__in=RETRYABLE_STATUSES).order_by("created_at"):
                job_retry(job_id=child.pk)
            _batch_child_finished(parent_id=job.pk, now=now)
            job.refresh_from_db()
            return job
        definition = pipeline_named(job.pipeline)
        dag = definition.dag(job.params)
        runs = {run.name: run for run in StageRun.objects.filter(job=job)}
        if runs and all(run.status == StageStatus.COMPLETED for run in runs.values()):
            # Every stage completed (a cancel came as the last one finished): nothing is
            # left to run, and a job left pending with nothing queued would wait forever.
            # The retry completes it, with the result its stages made.
            job.started_at = now
            if job.parent_id:
                _batch_reopen(parent_id=job.parent_id, now=now)
            outputs = {name: run.output for name, run in runs.items()}
            result = definition.result(outputs, dag)
            _finish_job(job, JobStatus.COMPLETED, now=now, result=result, runs=list(runs.values()))
            return job
        for run in runs.values():
            if run.status == StageStatus.COMPLETED:
                continue
            run.status = StageStatus.WAITING
            run.attempt_floor = run.attempt
            run.error = None
            run.output = None
            run.progress = 0.0
            run.lease_token = None
            run.lease_expires_at = None
            run.started_at = None
            run.finished_at = None
            run.save()
            if not all(
                runs[p].status == StageStatus.COMPLETED for p in dag.stage(run.name).depends_on
            ):
                _stage_changed(job, run)  # waiting; the queued ones are told by the enqueue
        for name in dag.order:
            run = runs[name]
            if run.status == StageStatus.WAITING and all(
                runs[p].status == StageStatus.COMPLETED for p in dag.stage(name).depends_on
            ):
                _enqueue_stage(job, run, dag.stage(name))
        _update_progress(job)
        job.save(update_fields=["progress", "updated_at"])
        _job_changed(job)  # after the stages: the progress it shows is the reset one
        if job.parent_id:
            _batch_reopen(parent_id=job.parent_id, now=now)
        return job


def job_files(job_id: Any) -> Path:
    """The folder of a job's files under the media root (removed with the job)."""
    return Path(settings.MEDIA_ROOT) / "jobs" / str(job_id)


def _job_files_delete(job_id: Any) -> None:
    """A job's scratch folder, and its artifacts where they are not in that folder (a
    bucket)."""
    shutil.rmtree(job_files(job_id), ignore_errors=True)
    if not media.is_local_storage():
        media.artifacts_delete(media.job_artifact_name(job_id, ""))


def job_delete(*, job_id: Any) -> None:
    """Remove a finished job with its stages, logs, children and files."""
    with transaction.atomic():
        job = _lock_job(job_id)
        if not job.is_finished:
            raise OmnivaError(
                ErrorCode.JOB_ACTIVE, f"Job {job.pk} is {job.status}; cancel it before deleting."
            )
        ids = [job.pk, *job.children.values_list("pk", flat=True)]
        broker.drop_stage_tasks(
            stage_run_ids=list(StageRun.objects.filter(job_id__in=ids).values_list("pk", flat=True))
        )
        for deleted in ids:
            core_services.activity_record(
                kind="job:deleted",
                data={"id": deleted},
                job_id=deleted,
                project_id=job.project_id,
            )
        job.delete()
        transaction.on_commit(lambda: [_job_files_delete(i) for i in ids])


# A century: older than that is before any job, and further back the cutoff overflows.
CLEANUP_MAX_AGE_S = 100 * 365 * 86400


def _cleanup_cutoff(max_age_s: int, statuses: list[str] | None) -> tuple[datetime, list[str]]:
    if not 0 <= max_age_s <= CLEANUP_MAX_AGE_S:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"max_age_s is between 0 and {CLEANUP_MAX_AGE_S}.",
            details={"max_age_s": [f"between 0 and {CLEANUP_MAX_AGE_S}"]},
        )
    wanted = list(statuses or FINISHED_STATUSES)
    unknown = sorted(set(wanted) - set(FINISHED_STATUSES))
    if unknown:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"Only finished jobs are cleaned up; not {', '.join(unknown)}.",
            details={"statuses": [f"not a finished status: {s}" for s in unknown]},
        )
    return timezone.now() - timedelta(seconds=max_age_s), wanted


def jobs_cleanup(*, max_age_s: int = 86400, statuses: list[str] | None = None) -> int:
    """Delete finished jobs (top-level, with their children) that ended over max_age_s
    ago, in batches (jobs_prune); how many jobs, children included."""
    before, wanted = _cleanup_cutoff(max_age_s, statuses)
    return jobs_prune(before=before, statuses=wanted)


# Top-level jobs deleted per transaction, each with its children (a batch job has up to
# 1,000), their stage runs, logs, queue rows and, once committed, their files.
JOB_PRUNE_BATCH = 200


def jobs_prune(
    *,
    before: datetime,
    statuses: list[str] | tuple[str, ...] = FINISHED_STATUSES,
    deadline: float | None = None,
) -> int:
    """Delete the top-level jobs of `statuses` that finished before `before`, with their
    children, in batches of JOB_PRUNE_BATCH, each its own transaction, until none is
    left or the monotonic clock passes `deadline`; how many jobs, children included."""
    deleted = 0
    after: datetime | None = None
    while deadline is None or time.monotonic() < deadline:
        with transaction.atomic():
            seen, ids, after = _jobs_prune_batch(before=before, after=after, statuses=statuses)
        deleted += len(ids)
        if seen < JOB_PRUNE_BATCH or not ids:
            break
    return deleted


def _jobs_prune_batch(
    *, before: datetime, after: datetime | None, statuses: list[str] | tuple[str, ...]
) -> tuple[int, list[Any], datetime | None]:
    """(top-level jobs looked at, ids deleted, the last one's finished_at) of one batch,
    in the caller's transaction. It starts at `after`, where the last batch ended (see
    omniva.services.prune_in_batches)."""
    finished = Job.objects.filter(parent__isnull=True, status__in=statuses, finished_at__lt=before)
    if after is not None:
        finished = finished.filter(finished_at__gte=after)
    picked = list(
        finished.order_by("finished_at").values_list("pk", "finished_at")[:JOB_PRUNE_BATCH]
    )
    if not picked:
        return 0, [], after
    candidates = [pk for pk, _finished_at in picked]
    # Children before their batch: the lock order of every child transition (a retried
    # child reopens its batch). A family one of whose children someone holds, or is not
    # finished, is left for a later pass; so is a job someone holds.
    family_sizes = dict(
        Job.objects.filter(parent_id__in=candidates)
        .order_by()
        .values_list("parent_id")
        .annotate(n=Count("pk"))
    )
    children = list(
        Job.objects.select_for_update(skip_locked=True)
        .filter(parent_id__in=candidates, status__in=FINISHED_STATUSES)
        .order_by()
        .values_list("pk", "parent_id")
    )
    locked = Counter(parent for _child, parent in children)
    whole = [pk for pk in candidates if locked[pk] == family_sizes.get(pk, 0)]
    parents = set(
        Job.objects.select_for_update(skip_locked=True)
        .filter(pk__in=whole, status__in=statuses, finished_at__lt=before)
        .order_by()
        .values_list("pk", flat=True)
    )
    ids = [*parents, *(child for child, parent in children if parent in parents)]
    if not ids:
        return len(candidates), [], picked[-1][1]
    broker.drop_stage_tasks(
        stage_run_ids=list(
            StageRun.objects.filter(job_id__in=ids).order_by().values_list("pk", flat=True)
        )
    )
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM jobs_joblog WHERE job_id = ANY(%s)", [ids])
        cursor.execute("DELETE FROM jobs_stagerun WHERE job_id = ANY(%s)", [ids])
        cursor.execute("DELETE FROM jobs_job WHERE id = ANY(%s)", [ids])
    transaction.on_commit(lambda: [_job_files_delete(i) for i in ids])
    return len(candidates), ids, picked[-1][1]


# The django-q2 schedule (made by jobs/migrations/0003_retention_schedule.py) that runs a
# retention pass in the default cluster every RETENTION_EVERY_MIN minutes.
RETENTION_SCHEDULE = "omniva:retention"
RETENTION_TASK = "jobs.tasks.retention_run"
RETENTION_EVERY_MIN = 10


def metric_tallies_advance(*, now: datetime | None = None) -> bool:
    """Fold the Prometheus figures of the rows finished (or created) up to
    METRIC_SETTLE_S ago into MetricTally and move its cursor there, so that a scrape
    reads only the rows since. False when another process is at it, or a reader holds
    the tallies (the next scrape folds them)."""
    from jobs import selectors

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_try_advisory_xact_lock(hashtext(%s))", [selectors.METRIC_TALLY_LOCK]
            )
            if not cursor.fetchone()[0]:
                return False
        held = MetricCursor.objects.first()
        until = (now or timezone.now()) - timedelta(seconds=selectors.METRIC_SETTLE_S)
        if held is not None and until <= held.through:
            return True
        window = selectors.metric_window(after=held.through if held else None, until=until)
        tallies = {(t.kind, tuple(t.labels)): t for t in MetricTally.objects.all()}
        for key, figure in window.items():
            tally = tallies.get(key) or MetricTally(kind=key[0], labels=list(key[1]))
            folded = {key: selectors.tally_figure(tally)}
            selectors.add_figures(folded, {key: figure})
            tally.count = folded[key]["count"]
            tally.total_s = folded[key]["sum"]
            tally.buckets = folded[key]["buckets"]
            tally.save()
        if held is None:
            MetricCursor.objects.create(through=until)
        else:
            held.through = until
            held.save(update_fields=["through"])
    return True


def retention_run(
    *,
    job_max_age_s: int | None = None,
    statuses: list[str] | None = None,
    budget_s: float | None = None,
) -> dict[str, int]:
    """One retention pass: take the events past their deadline out of the queue (their
    jobs time out) and dead-letter those whose last lease ran out, then delete,
    in batches, what is past its retention: activity rows, audit records, finished
    events, and finished jobs (OMNIVA_JOB_RETENTION_DAYS, or `job_max_age_s`). A pass
    that runs out of `budget_s` leaves the rest to the next one. How many of each."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    if job_max_age_s is None:
        job_max_age_s = settings.OMNIVA_JOB_RETENTION_DAYS * 86400
    before, wanted = _cleanup_cutoff(job_max_age_s, statuses)
    days = timedelta(days=1)
    # Past their deadline first: those jobs time out rather than fail (as at a claim).
    report = {"timed_out": engines.events_expire_overdue()}
    report["dead_lettered"] = engines.events_dead_letter_exhausted()
    report["activity"] = core_services.activity_prune(
        older_than=days * settings.OMNIVA_ACTIVITY_RETENTION_DAYS, deadline=deadline
    )
    report["audit_records"] = core_services.audit_records_prune(
        older_than=days * settings.OMNIVA_AUDIT_RETENTION_DAYS, deadline=deadline
    )
    report["events"] = engines.events_prune(
        older_than=days * settings.OMNIVA_EVENT_RETENTION_DAYS, deadline=deadline
    )
    report["jobs"] = jobs_prune(before=before, statuses=wanted, deadline=deadline)
    return report


def job_may_be_due(job: Job) -> bool:
    """Whether a read of `job` should settle it (job_expire_if_due): it is active and past
    queue_timeout_s or timeout_s as far as its own row tells (no query)."""
    if job.status not in ACTIVE_STATUSES:
        return False
    since = job.started_at or job.pending_since
    limits = [job.timeout_s] if job.started_at else [job.timeout_s, job.queue_timeout_s]
    shortest = min((limit for limit in limits if limit), default=None)
    return bool(since and shortest and timezone.now() >= since + timedelta(seconds=shortest))


def job_expire_if_due(*, job_id: Any) -> Job:
    """Time out a job past a deadline that no worker enforces (read paths call this, so a
    queue with no worker at all, or an engine type with no engine, still reports
    TIMEOUT): one still waiting past queue_timeout_s, or one whose engine stage is past
    its deadline (`_engine_deadline`)."""
    with transaction.atomic():
        job = _lock_job(job_id)
        now = timezone.now()
        if job.status == JobStatus.PENDING and _expire_if_queue_timed_out(job, now):
            return job
        if job.status in ACTIVE_STATUSES:
            engine_run = (
                StageRun.objects.filter(
                    job=job, status__in=[StageStatus.QUEUED, StageStatus.RUNNING]
                )
                .exclude(engine_type="")
                .order_by("position")
                .first()
            )
            if engine_run is not None:
                _expire_engine_job(job, engine_run, now)
        return job


# --- gpu worker status -------------------------------------------------------------------


def gpu_report_save(*, worker: str, data: dict[str, Any]) -> None:
    """A gpu worker's status report (jobs/inference.py), replacing its previous one."""
    GpuWorkerReport.objects.update_or_create(
        worker=worker[:200], defaults={"reported_at": timezone.now(), "data": data}
    )


# --- query embeddings (clip search) ------------------------------------------------------

QUERY_EMBEDDING_TIMEOUT_S = 15.0


def query_embedding_make(*, text: str, project: Project | None) -> list[float]:
    """The vector of `text`, made by an `embed_texts` job on the gpu queue (batched with
    whatever else waits there), so no web process loads a model. 503 when no gpu
    worker made it in time (the job is cancelled)."""
    from jobs.waiting import wait_for_job

    job, _ = job_submit(pipeline="embed_texts", params={"texts": [text]}, project=project)
    job = wait_for_job(job.pk, timeout_s=QUERY_EMBEDDING_TIMEOUT_S)
    if job.status == JobStatus.COMPLETED:
        return job.result["vectors"][0]
    if not job.is_finished:
        with contextlib.suppress(OmnivaError):
            job_cancel(job_id=job.pk, reason="the search gave up waiting")
    raise OmnivaError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "No gpu worker embedded the query in time; try again later.",
        status=503,
    )
