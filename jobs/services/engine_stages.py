"""Stages that run on engines: the orchestrator's side of an engine event's life.

An engine stage is an Event (engines/); these are the orchestrator's side of its
life, called by engines through the callbacks registered in jobs/apps.py. Its end goes
through stage_complete / stage_fail like a worker stage's. The event's lease fences
the engine; the stage run has no lease of its own (lease_expires_at stays empty), so
a cancel ends it at once and dead-ends the event.

No worker's alarm bounds an engine stage, so its deadline is derived: the event carries
it (Event.deadline, `_engine_deadline`), the claim never hands it out past it, and a
report, a claim of its engine type, a read of the job (job_expire_if_due) or the
retention pass, whichever comes first, times the job out (stage_engine_expire).
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from engines import services as engines
from jobs.models import (
    Job,
    JobStatus,
    StageRun,
    StageStatus,
)
from jobs.pipelines.context import StageInterrupted
from jobs.services.activity import _job_changed, _stage_changed
from jobs.services.attempts import stage_complete, stage_fail, stage_report
from jobs.services.core import _deadline, _engine_deadline, _lock_job_of_stage, _time_out
from omniva.errors import FailureCode, OmnivaError


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
                code=str(error.get("code") or FailureCode.ENGINE_ERROR),
                message=str(error.get("message") or ""),
                retryable=False,
            )


def engine_stage_callbacks() -> engines.StageCallbacks:
    """The orchestrator's side of engine events, as engines calls it (registered by
    JobsConfig.ready: engines never imports jobs)."""
    return engines.StageCallbacks(
        lock=lambda stage_run_id: _lock_job_of_stage(stage_run_id) and None,
        claimed=lambda stage_run_id, engine: stage_engine_claimed(
            stage_run_id=stage_run_id, engine=engine
        ),
        progress=lambda stage_run_id, progress: stage_engine_progress(
            stage_run_id=stage_run_id, progress=progress
        ),
        finished=lambda stage_run_id, output, error, engine: stage_engine_finished(
            stage_run_id=stage_run_id, output=output, error=error, engine=engine
        ),
        expire=lambda stage_run_id: stage_engine_expire(stage_run_id=stage_run_id),
    )
