"""Submitting jobs: one statement per submission (the job, its stages, their activity rows,
their queue rows and wake-ups).
"""

from __future__ import annotations

import contextlib
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from jobs import broker
from jobs.models import (
    PRIORITY_WORDS,
    Job,
    JobStatus,
    StageRun,
    StageStatus,
)
from jobs.services.activity import _activity_row, _job_changed, _job_summary, _stage_summary
from jobs.services.core import (
    BATCH_PIPELINE,
    _enqueue_stage,
    _log,
    job_await,
    pipeline_named,
    queue_guard,
    task_payload,
)
from omniva import services as core_services
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import ACTIVITY_CHANNEL, Project
from omniva.rows import ModelRows


def parse_priority(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() in PRIORITY_WORDS:
        return PRIORITY_WORDS[value.strip().lower()]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            "priority is 0-10 or one of low, normal, high, urgent.",
            details={"priority": ["0-10 or low, normal, high, urgent"]},
        )
    return value


def _known_job(idempotency_key: str | None, bound_project: Project | None) -> Job | None:
    """The job `idempotency_key` first created, if any. A caller bound to a project must
    not learn of another project's job (nor reuse its key): CONFLICT."""
    if not idempotency_key:
        return None
    existing = Job.objects.filter(idempotency_key=idempotency_key).first()
    if (
        existing is not None
        and bound_project is not None
        and existing.project_id != bound_project.pk
    ):
        raise OmnivaError(
            ErrorCode.CONFLICT, "This idempotency key is already used outside this project."
        )
    return existing


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
    bound_project: Project | None = None,
    parent: Job | None = None,
    awaited: bool = False,
) -> tuple[Job, bool]:
    """Create a job and enqueue its root stages; (job, created). A known idempotency key
    returns the job it first created, never a second one; to a caller bound to a project
    (`bound_project`, its API key's), only when that job is its project's."""
    definition = pipeline_named(pipeline)
    params = {} if params is None else params
    errors = definition.validation_errors(params)
    if errors:
        raise OmnivaError(ErrorCode.VALIDATION_ERROR, "The params are not valid.", details=errors)
    existing = _known_job(idempotency_key, bound_project)
    if existing is not None:
        if awaited:
            job_await(job_id=existing.pk)
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
        awaited=awaited,
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
        existing = _known_job(idempotency_key, bound_project)
        if existing is not None:
            if awaited:
                job_await(job_id=existing.pk)
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
            ACTIVITY_CHANNEL,
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
    bound_project: Project | None = None,
) -> tuple[Job, bool]:
    """A parent job whose children run independently; it ends when all of them have. A
    known idempotency key returns its batch, as job_submit does."""
    existing = _known_job(idempotency_key, bound_project)
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
        existing = _known_job(idempotency_key, bound_project)
        if existing is not None:
            return existing, False
        raise
    return parent, True
