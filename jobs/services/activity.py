"""A job's and a stage run's state as a live client sees it (the outbox, omniva.models.Activity).

The one-statement transitions build the same objects in SQL (fastpath.START_SQL,
fastpath.COMPLETE_SOLE_STAGE_SQL) from the same field lists (tests/jobs/test_activity.py
compares their values).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jobs.models import (
    Job,
    StageRun,
)
from omniva import services as core_services

# The fields of a job's and a stage run's activity payload, in one list each: the Python
# transitions (`_job_summary`, `_stage_summary`) and the one-statement ones in SQL
# (`payload_sql`) build them from these, so both write the same fields in the same formats.
JOB_FIELDS = (
    "id",
    "pipeline",
    "status",
    "progress",
    "priority",
    "project_id",
    "attempts",
    "error",
    "updated_at",
)
STAGE_FIELDS = ("job_id", "id", "name", "status", "attempt", "progress", "worker", "error")
# Timestamps are written in UTC with microseconds, whichever path wrote them.
TIMESTAMP_FIELDS = frozenset({"updated_at"})
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
TIMESTAMP_FORMAT_SQL = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


def payload_time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


def _payload(row: Job | StageRun, fields: tuple[str, ...]) -> dict[str, Any]:
    return {
        field: payload_time(getattr(row, field))
        if field in TIMESTAMP_FIELDS
        else getattr(row, field)
        for field in fields
    }


def payload_sql(alias: str, fields: tuple[str, ...]) -> str:
    """The `jsonb_build_object(...)` of a row `alias` of jobs_job or jobs_stagerun."""
    pairs = [
        f"'{field}', to_char({alias}.{field} AT TIME ZONE 'UTC', '{TIMESTAMP_FORMAT_SQL}')"
        if field in TIMESTAMP_FIELDS
        else f"'{field}', {alias}.{field}"
        for field in fields
    ]
    return f"jsonb_build_object({', '.join(pairs)})"


def _job_summary(job: Job) -> dict[str, Any]:
    return _payload(job, JOB_FIELDS)


def _stage_summary(run: StageRun) -> dict[str, Any]:
    return _payload(run, STAGE_FIELDS)


def _activity_row(kind: str, job: Job, data: dict[str, Any]) -> core_services.ActivityRow:
    return core_services.ActivityRow(kind=kind, data=data, job_id=job.pk, project_id=job.project_id)


def _activity(kind: str, job: Job, data: dict[str, Any]) -> None:
    core_services.activity_records([_activity_row(kind, job, data)])


def _job_changed(job: Job, kind: str = "job:update") -> None:
    _activity(kind, job, _job_summary(job))


def _stage_changed(job: Job, run: StageRun) -> None:
    _activity("stage:update", job, _stage_summary(run))
