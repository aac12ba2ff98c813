"""Event types, queueing an event, and the claim (`CLAIM_SQL`, one statement), with the
long poll that waits for one."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from engines.models import EngineInstance, Event, EventStatus, EventType
from engines.selectors import held_events_filter
from engines.services.activity import _event_changed, _notify_claimable
from engines.services.core import DEFAULT_BATCH_SIZE, listener, logger, stage_callbacks
from engines.services.deadletter import _dead_letter_exhausted
from engines.services.expiry import _expire_overdue
from engines.services.registration import _engine
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import ACTIVITY_CHANNEL


def event_type_create(
    *,
    name: str,
    engine_type: str,
    description: str = "",
    default_priority: int = 5,
    max_retries: int | None = None,
    lease_s: int | None = None,
) -> EventType:
    try:
        with transaction.atomic():
            return EventType.objects.create(
                name=name,
                engine_type=engine_type,
                description=description,
                default_priority=default_priority,
                max_retries=settings.OMNIVA_MAX_RETRIES if max_retries is None else max_retries,
                lease_s=lease_s or settings.OMNIVA_EVENT_LEASE_S,
            )
    except IntegrityError:
        raise OmnivaError(
            ErrorCode.CONFLICT,
            f"An event type named {name!r} exists.",
            details={"name": ["already exists"]},
        ) from None


def event_type_for_engine(engine_type: str) -> EventType:
    """The event type of job stages on `engine_type` (named like it), made on first use."""
    event_type = EventType.objects.filter(name=engine_type).first()
    if event_type is not None:
        return event_type
    try:
        with transaction.atomic():
            return EventType.objects.create(
                name=engine_type,
                engine_type=engine_type,
                description=f"Job stages that run on {engine_type} engines.",
                max_retries=settings.OMNIVA_MAX_RETRIES,
                lease_s=settings.OMNIVA_EVENT_LEASE_S,
            )
    except IntegrityError:  # made concurrently
        return EventType.objects.get(name=engine_type)


def event_create(
    *,
    event_type: EventType,
    data: dict[str, Any] | None = None,
    priority: int | None = None,
    max_retries: int | None = None,
    stage_run_id: int | None = None,
    job_id: Any = None,
    project_id: Any = None,
    delay_s: float = 0,
    deadline: datetime | None = None,
) -> Event:
    """Queue an event; engines of its type waiting in a long poll wake at commit. It is
    not handed out at or after `deadline`."""
    now = timezone.now()
    event = Event.objects.create(
        event_type=event_type,
        engine_type=event_type.engine_type,
        priority=event_type.default_priority if priority is None else priority,
        data=data or {},
        max_retries=event_type.max_retries if max_retries is None else max_retries,
        lease_s=event_type.lease_s,
        available_at=now + timedelta(seconds=delay_s),
        stage_run_id=stage_run_id,
        job_id=job_id,
        project_id=project_id,
        deadline=deadline,
        created_at=now,
    )
    _event_changed(event)
    if delay_s <= 0:
        _notify_claimable(event.engine_type)
    return event


# `picked` is MATERIALIZED so the rows are picked once (as `e.id IN (subquery)` a plan
# that rescans the subquery takes up to LIMIT more rows on each scan).
CLAIM_SQL = """
WITH picked AS MATERIALIZED (
    SELECT id FROM engines_event
    WHERE engine_type = %(engine_type)s AND status IN (%(pending)s, %(leased)s)
      AND ((status = %(pending)s AND available_at <= %(now)s)
           OR (status = %(leased)s AND lock_until < %(now)s AND retry_count < max_retries))
      AND (deadline IS NULL OR deadline > %(now)s)
    ORDER BY priority DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE engines_event e
    SET status = %(leased)s,
        retry_count = e.retry_count + CASE WHEN e.status = %(leased)s THEN 1 ELSE 0 END,
        lease_token = gen_random_uuid(),
        lock_until = %(now)s + make_interval(secs => e.lease_s),
        leased_by_id = %(engine)s,
        claimed_by = %(claimant)s,
        leased_at = %(now)s,
        progress = 0,
        updated_at = %(now)s
    FROM engines_eventtype t, picked
    WHERE t.id = e.event_type_id AND e.id = picked.id
    RETURNING e.*, t.name AS event_type_name
), activity AS (
    INSERT INTO omniva_activity (at, kind, job_id, project_id, data)
    SELECT %(now)s, 'event:update', c.job_id, c.project_id, jsonb_build_object(
        'id', c.id, 'event_type_id', c.event_type_id, 'engine_type', c.engine_type,
        'status', c.status, 'priority', c.priority, 'retry_count', c.retry_count,
        'lock_until', c.lock_until, 'engine_id', c.leased_by_id,
        'stage_run_id', c.stage_run_id, 'progress', c.progress, 'error', c.error)
    FROM claimed c
)
SELECT claimed.*, pg_notify(%(activity_channel)s, '') AS notified FROM claimed
"""


def events_claim_now(
    *, engine_type: str, engine: EngineInstance | None, batch_size: int, claimant: str = ""
) -> list:
    """One claim, without waiting: the leased events, highest priority then oldest.
    `claimant` (who asks: `key:<id>`, `user:<id>`) is recorded for token-less reports."""
    now = timezone.now()
    _expire_overdue(now, engine_type=engine_type)
    _dead_letter_exhausted(now, engine_type=engine_type)
    limit = batch_size
    if engine is not None and engine.max_concurrent_events:
        held = Event.objects.filter(held_events_filter(now), leased_by=engine).count()
        limit = max(0, min(batch_size, engine.max_concurrent_events - held))
    if limit == 0:
        return []
    with transaction.atomic():
        # The engine must still exist when its claim commits (it may deregister while
        # its long poll waits): lock its row against deletion for this transaction.
        if engine is not None and not (
            EngineInstance.objects.filter(pk=engine.pk).select_for_update(no_key=True).exists()
        ):
            raise OmnivaError(ErrorCode.ENGINE_NOT_FOUND, f"No engine {engine.pk}.")
        events = list(
            Event.objects.raw(
                CLAIM_SQL,
                {
                    "leased": EventStatus.LEASED,
                    "pending": EventStatus.PENDING,
                    "now": now,
                    "engine": engine.pk if engine else None,
                    "claimant": claimant[:64],
                    "engine_type": engine_type,
                    "limit": limit,
                    "activity_channel": ACTIVITY_CHANNEL,
                },
            )
        )
        if stage_callbacks() is not None:
            worker = engine.name if engine else f"{engine_type} engine"
            for event in events:
                if event.stage_run_id is not None:
                    transaction.on_commit(
                        functools.partial(_stage_claimed, event.stage_run_id, worker)
                    )
    events.sort(key=lambda event: (-event.priority, event.pk))
    return events


def _stage_claimed(stage_run_id: int, worker: str) -> None:
    try:
        callbacks = stage_callbacks()
        assert callbacks is not None
        callbacks.claimed(stage_run_id, worker)
    except Exception:
        # The stage is marked running at its completion anyway; never fail the claim.
        logger.exception("marking stage run %s as claimed failed", stage_run_id)


def events_claim(
    *,
    engine_type: str,
    engine_id: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    wait_s: float = 0,
    claimant: str = "",
) -> list:
    """Claim up to `batch_size` events; with `wait_s`, wait for the first to appear
    (woken by NOTIFY, not by polling). `claimant`: who asks (Event.claimed_by)."""
    engine = _engine(engine_id) if engine_id else None
    if engine is not None and engine.engine_type != engine_type:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"Engine {engine.name} is a {engine.engine_type} engine, not {engine_type}.",
            details={"engine_id": ["belongs to another engine type"]},
        )

    def claim() -> list:
        return events_claim_now(
            engine_type=engine_type, engine=engine, batch_size=batch_size, claimant=claimant
        )

    if wait_s <= 0:
        return claim()
    return listener.wait_until(engine_type, read=claim, done=bool, timeout_s=wait_s)
