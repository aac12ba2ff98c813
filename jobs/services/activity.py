"""A job's and a stage run's state as a live client sees it (the outbox, omniva.models.Activity).

The one-statement transitions build the same objects in SQL (fastpath.START_SQL,
fastpath.COMPLETE_SOLE_STAGE_SQL): keep them alike (tests/jobs/test_activity.py compares them).
"""

from __future__ import annotations

from typing import Any

from jobs.models import (
    Job,
    StageRun,
)
from omniva import services as core_services


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
