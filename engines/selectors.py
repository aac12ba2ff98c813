"""Reads of engines and events: lists with their filters, and the figures of
/v1/metrics, /metrics and the `engines` health check."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import django_filters
from django.db import connection
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from engines.models import EngineInstance, EngineStatus, Event, EventStatus, offline_before
from omniva.api.filters import ValidatedFilterSet
from omniva.selectors import counts_bounded


def held_events_filter(now: datetime | None = None) -> Q:
    """Events an engine holds: leased to it, and the lease has not run out."""
    return Q(status=EventStatus.LEASED, lock_until__gte=now or timezone.now())


def with_held_events(engines: QuerySet[EngineInstance]) -> QuerySet[EngineInstance]:
    """Annotate `held_events`: how many events each engine holds (lease not run out)."""
    return engines.annotate(
        held_events=Count(
            "leased_events",
            filter=Q(
                leased_events__status=EventStatus.LEASED,
                leased_events__lock_until__gte=timezone.now(),
            ),
        )
    )


class EngineFilter(ValidatedFilterSet):
    """GET /v1/engines's filters (engines.api.serializers.EngineFilterSerializer)."""

    engine_type = django_filters.CharFilter()
    # An engine's status is derived from time: one whose heartbeat is older than the
    # offline threshold is offline whatever it last reported, and the others are what
    # they reported. Not a column lookup, so a method of its own.
    status = django_filters.ChoiceFilter(choices=EngineStatus.choices, method="filter_status")

    def filter_status(self, engines: QuerySet, name: str, status: str) -> QuerySet:
        if status == EngineStatus.OFFLINE:
            return engines.filter(last_heartbeat__lt=offline_before())
        return engines.filter(reported_status=status, last_heartbeat__gte=offline_before())


def engine_list(*, filters: dict[str, Any]) -> QuerySet[EngineInstance]:
    engines = with_held_events(EngineInstance.objects.order_by("engine_type", "name"))
    return EngineFilter.apply(engines, filters)


class EventFilter(ValidatedFilterSet):
    """GET /v1/events's filters (engines.api.serializers.EventFilterSerializer)."""

    status = django_filters.ChoiceFilter(choices=EventStatus.choices)
    engine_type = django_filters.CharFilter()
    event_type = django_filters.CharFilter(field_name="event_type__name")


def event_list(*, filters: dict[str, Any]) -> QuerySet[Event]:
    events = Event.objects.select_related("event_type").order_by("-id")
    return EventFilter.apply(events, filters)


# The engine types events hold, one step down an index per type (a loose index scan):
# through the finished-events index, and through the claim index for the rest.
_ENGINE_TYPES_SQL = """
WITH RECURSIVE finished(engine_type) AS (
    SELECT min(engine_type) FROM engines_event WHERE status IN ('completed', 'dead_lettered')
    UNION ALL
    SELECT (SELECT min(engine_type) FROM engines_event
            WHERE status IN ('completed', 'dead_lettered') AND engine_type > finished.engine_type)
    FROM finished WHERE finished.engine_type IS NOT NULL
), active(engine_type) AS (
    SELECT min(engine_type) FROM engines_event WHERE status IN ('pending', 'leased')
    UNION ALL
    SELECT (SELECT min(engine_type) FROM engines_event
            WHERE status IN ('pending', 'leased') AND engine_type > active.engine_type)
    FROM active WHERE active.engine_type IS NOT NULL
)
SELECT engine_type FROM finished WHERE engine_type IS NOT NULL
UNION SELECT engine_type FROM active WHERE engine_type IS NOT NULL
"""


def event_engine_types() -> list[str]:
    """Every engine type that some event has, in order."""
    with connection.cursor() as cursor:
        cursor.execute(_ENGINE_TYPES_SQL)
        return sorted(row[0] for row in cursor.fetchall())


def event_counts() -> dict[str, dict[str, int]]:
    """{engine_type: {status: count}} of the events the database holds: each count
    bounded (omniva.selectors.counts_bounded) over the claim index or the finished one."""
    conditions = {
        (engine_type, status): ("engine_type = %s AND status = %s", [engine_type, status])
        for engine_type in event_engine_types()
        for status in EventStatus.values
    }
    counts: dict[str, dict[str, int]] = {}
    for (engine_type, status), n in counts_bounded("engines_event", conditions).items():
        if n:
            counts.setdefault(engine_type, {})[status] = n
    return counts


def engine_counts() -> dict[str, dict[str, int]]:
    """{engine_type: {status: count}}, offline derived from the last heartbeat."""
    counts: dict[str, dict[str, int]] = {}
    for engine in EngineInstance.objects.only("engine_type", "reported_status", "last_heartbeat"):
        by_status = counts.setdefault(engine.engine_type, {})
        by_status[engine.status] = by_status.get(engine.status, 0) + 1
    return counts


def contribute_metrics(metrics: dict[str, Any]) -> None:
    """/v1/metrics: events by status, engines online."""
    events = event_counts()
    by_status: dict[str, int] = {status: 0 for status in EventStatus.values}
    for per_type in events.values():
        for status, n in per_type.items():
            by_status[status] = by_status.get(status, 0) + n
    engines = engine_counts()
    online = sum(n for per_type in engines.values() for s, n in per_type.items() if s != "offline")
    metrics["events"] = by_status
    metrics["engines_online"] = online


def check_engines() -> dict[str, Any]:
    """Degraded when events wait for an engine type that has no engine online."""
    engines = engine_counts()
    online_types = {
        engine_type
        for engine_type, per_status in engines.items()
        if any(status != EngineStatus.OFFLINE for status in per_status)
    }
    waiting = (
        Event.objects.filter(status=EventStatus.PENDING)
        .order_by()  # not by id (the default): distinct types, not one row per event
        .values_list("engine_type", flat=True)
        .distinct()
    )
    unserved = sorted(set(waiting) - online_types)
    result: dict[str, Any] = {
        "status": "degraded" if unserved else "ok",
        "online": {t: sum(n for s, n in c.items() if s != "offline") for t, c in engines.items()},
    }
    if unserved:
        result["detail"] = "events wait for engine types with no engine online"
        result["unserved_engine_types"] = unserved
    return result
