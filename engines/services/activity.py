"""The live stream's outbox (omniva.models.Activity) for engines and events, and the
NOTIFY that wakes the long polls of an engine type."""

from __future__ import annotations

from typing import Any

from django.db import connection

from engines.models import EVENTS_CHANNEL, EngineInstance, Event
from omniva.services import activity_record

# An engine's and an event's state as a live client sees it; CLAIM_SQL builds the same
# event object in SQL: keep them alike.


def _engine_summary(engine: EngineInstance) -> dict[str, Any]:
    return {
        "id": engine.pk,
        "engine_type": engine.engine_type,
        "name": engine.name,
        "status": engine.status,
        "current_workload": engine.current_workload,
        "resource_utilization": engine.resource_utilization,
        "last_heartbeat": engine.last_heartbeat,
    }


def _event_summary(event: Event) -> dict[str, Any]:
    return {
        "id": event.pk,
        "event_type_id": event.event_type_id,
        "engine_type": event.engine_type,
        "status": event.status,
        "priority": event.priority,
        "retry_count": event.retry_count,
        "lock_until": event.lock_until,
        "engine_id": event.leased_by_id,
        "stage_run_id": event.stage_run_id,
        "progress": event.progress,
        "error": event.error,
    }


def _engine_changed(engine: EngineInstance, kind: str = "engine:update") -> None:
    activity_record(kind=kind, data=_engine_summary(engine))


def _event_changed(event: Event) -> None:
    activity_record(
        kind="event:update",
        data=_event_summary(event),
        job_id=event.job_id,
        project_id=event.project_id,
    )


def _notify_claimable(engine_type: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [EVENTS_CHANNEL, engine_type])
