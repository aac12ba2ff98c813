"""Engines: registration, heartbeats (which extend their leases) and deregistration
(which puts the events they hold back in the queue)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from engines.models import (
    REPORTED_ENGINE_STATUSES,
    EngineInstance,
    EngineStatus,
    Event,
    EventStatus,
)
from engines.services.activity import _engine_changed, _event_changed, _notify_claimable
from omniva.errors import ErrorCode, OmnivaError


def _release_leases(engine: EngineInstance, now: datetime) -> int:
    """Put the events `engine` holds back in the queue; not a failed attempt."""
    # Only leases that still hold: one that ran out is a failed attempt, which the next
    # claim counts (and dead-letters after the last retry).
    held = Event.objects.filter(leased_by=engine, status=EventStatus.LEASED, lock_until__gte=now)
    released = list(held.select_for_update())
    for event in released:
        event.status = EventStatus.PENDING
        event.lease_token = None
        event.lock_until = None
        event.leased_by = None
        event.claimed_by = ""
        event.available_at = now
        event.save()
        _event_changed(event)
    for engine_type in sorted({event.engine_type for event in released}):
        _notify_claimable(engine_type)
    return len(released)


def engine_register(
    *,
    engine_type: str,
    name: str | None = None,
    capabilities: list[str] | None = None,
    resource_limits: dict[str, Any] | None = None,
) -> EngineInstance:
    """Register an engine; a name an online engine holds is refused (409), an offline
    holder of the name is replaced (its leases go back to the queue)."""
    name = name or f"{engine_type}-{uuid.uuid4().hex[:8]}"
    now = timezone.now()
    try:
        with transaction.atomic():
            holder = EngineInstance.objects.select_for_update().filter(name=name).first()
            if holder is not None:
                if holder.is_online(now):
                    raise OmnivaError(
                        ErrorCode.ENGINE_ALREADY_REGISTERED,
                        f"An online engine is registered as {name!r}.",
                    )
                _release_leases(holder, now)
                holder.delete()
            engine = EngineInstance.objects.create(
                engine_type=engine_type,
                name=name,
                capabilities=list(capabilities or []),
                resource_limits=dict(resource_limits or {}),
                reported_status=EngineStatus.ACTIVE,
                last_heartbeat=now,
                registered_at=now,
            )
            _engine_changed(engine)
            return engine
    except IntegrityError:  # registered concurrently under the same name
        raise OmnivaError(
            ErrorCode.ENGINE_ALREADY_REGISTERED, f"An online engine is registered as {name!r}."
        ) from None


def _engine(engine_id: Any, *, lock: bool = False) -> EngineInstance:
    engines = EngineInstance.objects.select_for_update() if lock else EngineInstance.objects
    try:
        return engines.get(pk=engine_id)
    except (EngineInstance.DoesNotExist, DjangoValidationError, ValueError, TypeError):
        raise OmnivaError(ErrorCode.ENGINE_NOT_FOUND, f"No engine {engine_id}.") from None


def engine_heartbeat(
    *,
    engine_id: Any,
    status: str | None = None,
    current_workload: int | None = None,
    resource_utilization: dict[str, Any] | None = None,
) -> EngineInstance:
    """Record a heartbeat and extend the leases (still held) of the engine's events; not
    of one past its deadline (a heartbeat does not keep a timed-out job's event)."""
    if status and status not in REPORTED_ENGINE_STATUSES:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"An engine reports one of {', '.join(REPORTED_ENGINE_STATUSES)}.",
            details={"status": [f"not one of {', '.join(REPORTED_ENGINE_STATUSES)}"]},
        )
    with transaction.atomic():
        engine = _engine(engine_id, lock=True)
        now = timezone.now()
        engine.last_heartbeat = now
        if status:
            engine.reported_status = status
        if current_workload is not None:
            engine.current_workload = current_workload
        if resource_utilization is not None:
            engine.resource_utilization = resource_utilization
        engine.save()
        _engine_changed(engine)
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE engines_event SET lock_until = %(now)s + make_interval(secs => lease_s),"
                " updated_at = %(now)s"
                " WHERE leased_by_id = %(engine)s AND status = %(leased)s"
                " AND lock_until >= %(now)s AND (deadline IS NULL OR deadline > %(now)s)",
                {"now": now, "engine": engine.pk, "leased": EventStatus.LEASED},
            )
        return engine


def engine_deregister(*, engine_id: Any) -> int:
    """Remove an engine; the events it holds go back to the queue. Returns how many."""
    with transaction.atomic():
        engine = _engine(engine_id, lock=True)
        released = _release_leases(engine, timezone.now())
        _engine_changed(engine, "engine:deregistered")
        engine.delete()
        return released
