"""Every write of engines and the leased event queue, one function per transition.

Lock order: when an event runs a job stage, the job's row is locked before the event's
(through its `StageCallbacks.lock`), as the orchestrator does when it cancels a job and
dead-ends the event; so the two never wait on each other in opposite orders.

The claim is one statement (`CLAIM_SQL`): highest priority then oldest, SKIP LOCKED, a
fresh lease token per event. A leased event whose `lock_until` passed is claimable
again and the claim counts that as a failed attempt (`retry_count` + 1); one that had
no retry left is dead-lettered by the next claim of its engine type instead.

An event may have a deadline (a job stage's: its job's, set by the orchestrator). The
claim never hands out an event past it, and whoever meets such an event first (a claim
of its engine type, a report on it, a read of its job, the retention pass) takes it out
of the queue: for a job stage, by timing the job out, which dead-ends its events.

Reports are fenced (`_fence`): by the lease token when the report carries it (the
batch requires it), else by the engine id it names, else (seed 000's client sends
neither) by who made the claim: a lease claimed without an engine id, with the same
key or user.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from engines.models import (
    EVENTS_CHANNEL,
    REPORTED_ENGINE_STATUSES,
    EngineInstance,
    EngineStatus,
    Event,
    EventStatus,
    EventType,
)
from engines.selectors import event_engine_types, held_events_filter
from omniva.errors import ErrorCode, FailureCode, OmnivaError
from omniva.models import ACTIVITY_CHANNEL
from omniva.notifications import Listener
from omniva.services import activity_record, prune_in_batches

logger = logging.getLogger("omniva.engines")

# Seed 000: batches of 3 by default, 10 at most; long polls of 30 s at most.
DEFAULT_BATCH_SIZE = 3
MAX_BATCH_SIZE = 10
MAX_WAIT_S = 30.0
# What an engine reports on an event it holds (PUT /v1/events/{id}/status).
REPORT_STATUSES = ("processing", "completed", "failed")
# Reports in one batch (PUT /v1/events/status): ten full claims' worth.
MAX_REPORT_BATCH = 100

listener = Listener(EVENTS_CHANNEL)


@dataclass
class StageCallbacks:
    """How an event that runs a job stage reaches the orchestrator. jobs registers them
    at start-up (engines never imports jobs, DESIGN.md)."""

    # Lock the job of the stage run, before the event's row is locked.
    lock: Callable[[int], None]
    # An engine took the event (called after the claim committed).
    claimed: Callable[[int, str], None]
    # The engine reported progress (0-100) in a `processing` update.
    progress: Callable[[int, float], None]
    # The event completed (output) or was dead-lettered (error), in the same transaction;
    # with the name of the engine that last held it, if any.
    finished: Callable[[int, Any, dict[str, Any] | None, str | None], None]
    # The event's deadline passed (called with the job locked): True when its job ended,
    # timed out now (which dead-ends the event) or before; False when the job still has
    # time, after moving the event's deadline to the job's (events_deadline_set).
    expire: Callable[[int], bool]


_stage_callbacks: StageCallbacks | None = None


def register_stage_callbacks(callbacks: StageCallbacks) -> None:
    """How events that run job stages reach the orchestrator (jobs' AppConfig.ready)."""
    global _stage_callbacks
    _stage_callbacks = callbacks


# --- activity (the live stream's outbox, omniva.models.Activity) -------------------------
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


def retry_backoff_s(retry_number: int) -> int:
    """Seed 000's retry policy, kept for events and job stages alike: the wait before
    retry number `retry_number` (1, 2, 3 → 30, 60, 120 s by default; the last repeats)."""
    backoff = settings.OMNIVA_RETRY_BACKOFF_S
    return backoff[min(retry_number - 1, len(backoff) - 1)] if backoff else 0


def _error(error: Any, default_code: str = FailureCode.ENGINE_ERROR) -> dict[str, Any]:
    if isinstance(error, dict):
        return {
            **error,
            "code": str(error.get("code") or default_code),
            "message": str(error.get("message") or "")[:2000],
        }
    return {"code": default_code, "message": str(error or "")[:2000]}


# --- engines -------------------------------------------------------------------------


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


# --- event types and events ----------------------------------------------------------


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


def _dead_letter_exhausted(
    now: datetime, *, engine_type: str | None = None, event_id: Any = None
) -> int:
    """Dead-letter the events (of `engine_type`, or the one event) whose last allowed
    lease ran out, up to 50; how many. One transaction each, taking the job's lock
    before the event's (see the module doc)."""
    candidates = Event.objects.filter(
        status=EventStatus.LEASED, lock_until__lt=now, retry_count__gte=F("max_retries")
    )
    if engine_type is not None:
        candidates = candidates.filter(engine_type=engine_type)
    if event_id is not None:
        candidates = candidates.filter(pk=event_id)

    def dead_letter(event: Event) -> bool:
        if (
            event.status != EventStatus.LEASED
            or event.lock_until is None
            or event.lock_until >= now
            or event.retry_count < event.max_retries
        ):
            return False
        error = {
            "code": FailureCode.LEASE_EXPIRED,
            "message": f"The lease ran out on the last of {event.max_retries} retries.",
        }
        _to_dead_letter(event, error, now, retry_count=event.retry_count + 1)
        return True

    return _each_locked(candidates, dead_letter)


def _each_locked(candidates: QuerySet[Event], act: Callable[[Event], bool]) -> int:
    """`act` on each of up to 50 `candidates`, in a transaction of its own that takes the
    job's lock before the event's (see the module doc) and passes over an event someone
    else holds; how many it acted on (`act` re-checks what the candidates were for)."""
    acted = 0
    for event_id, stage_run_id in candidates.values_list("id", "stage_run_id")[:50]:
        with transaction.atomic():
            if stage_run_id is not None and _stage_callbacks is not None:
                _stage_callbacks.lock(stage_run_id)
            event = Event.objects.select_for_update(skip_locked=True).filter(pk=event_id).first()
            if event is not None and act(event):
                acted += 1
    return acted


def _expire_if_overdue(event: Event, now: datetime) -> bool:
    """Take `event` (locked, its job's row first) out of the queue if its deadline
    passed; whether it left. A job stage's event goes through the orchestrator, which
    times the job out (dead-ending its events) or, when the job still has time, moves
    the event's deadline."""
    if (
        event.deadline is None
        or now < event.deadline
        or event.status not in (EventStatus.PENDING, EventStatus.LEASED)
    ):
        return False
    if event.stage_run_id is not None and _stage_callbacks is not None:
        ended = _stage_callbacks.expire(event.stage_run_id)
        event.refresh_from_db()  # the orchestrator dead-ended it, or moved its deadline
        if not ended or event.status not in (EventStatus.PENDING, EventStatus.LEASED):
            return ended
    error = {
        "code": FailureCode.DEADLINE_PASSED,
        "message": f"Not done by its deadline ({event.deadline}).",
    }
    _to_dead_letter(event, error, now)
    return True


def _expire_overdue(now: datetime, *, engine_type: str | None = None) -> int:
    """Take the events (of `engine_type`, or of every type) whose deadline passed out of
    the queue, up to 50; how many left. One transaction each, taking the job's lock
    before the event's (see the module doc)."""
    candidates = Event.objects.filter(
        status__in=[EventStatus.PENDING, EventStatus.LEASED], deadline__lte=now
    )
    if engine_type is not None:
        candidates = candidates.filter(engine_type=engine_type)
    return _each_locked(candidates, lambda event: _expire_if_overdue(event, now))


def events_expire_overdue() -> int:
    """Take every event past its deadline out of the queue, of every engine type (their
    jobs time out). A claim of the type does it for its own, and a read of the job for
    that job; this is for when neither comes (the retention pass, `manage.py cleanup`)."""
    moved = 0
    while batch := _expire_overdue(timezone.now()):
        moved += batch
    return moved


def events_deadline_set(*, stage_run_ids: list[int], deadline: datetime | None) -> int:
    """The orchestrator moved the deadline of these stages (their job started, or still
    has time): their unfinished events get it. The caller holds the job's lock."""
    if not stage_run_ids:
        return 0
    return Event.objects.filter(
        stage_run_id__in=stage_run_ids, status__in=[EventStatus.PENDING, EventStatus.LEASED]
    ).update(deadline=deadline, updated_at=timezone.now())


def events_dead_letter_exhausted() -> int:
    """Dead-letter every event whose last allowed lease ran out, of every engine type.
    A claim of the type does it for its own (nothing else sweeps); this is for when no
    engine of a type claims any more (`manage.py cleanup`)."""
    moved = 0
    while batch := _dead_letter_exhausted(timezone.now()):
        moved += batch
    return moved


# One engine type's events of one final status, oldest first along the finished index
# (omniva.services.prune_in_batches runs it).
_PRUNE_SQL = """
WITH deleted AS (
    DELETE FROM engines_event WHERE id = ANY(ARRAY(
        SELECT id FROM engines_event
        WHERE engine_type = %(engine_type)s AND status = %(status)s
          AND finished_at >= %(after)s AND finished_at < %(before)s
        ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ))
    RETURNING finished_at
)
SELECT count(*), max(finished_at) FROM deleted
"""


def events_prune(*, older_than: timedelta, deadline: float | None = None) -> int:
    """Delete the completed and dead-lettered events that finished over `older_than`
    ago, in batches; how many."""
    before = timezone.now() - older_than
    deleted = 0
    for engine_type in event_engine_types():
        for status in (EventStatus.COMPLETED, EventStatus.DEAD_LETTERED):
            deleted += prune_in_batches(
                sql=_PRUNE_SQL,
                params={"engine_type": engine_type, "status": str(status), "before": before},
                deadline=deadline,
            )
    return deleted


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
        if _stage_callbacks is not None:
            worker = engine.name if engine else f"{engine_type} engine"
            for event in events:
                if event.stage_run_id is not None:
                    transaction.on_commit(
                        lambda run=event.stage_run_id: _stage_claimed(run, worker)
                    )
    events.sort(key=lambda event: (-event.priority, event.pk))
    return events


def _stage_claimed(stage_run_id: int, worker: str) -> None:
    try:
        assert _stage_callbacks is not None
        _stage_callbacks.claimed(stage_run_id, worker)
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


def _locked_event(event_id: Any) -> Event:
    """Lock an event (its job first, when it runs a stage) or raise EVENT_NOT_FOUND."""
    try:
        stage_run_id = Event.objects.filter(pk=event_id).values_list("stage_run_id", flat=True)
        found = list(stage_run_id[:1])
    except (ValueError, TypeError):
        found = []
    if not found:
        raise OmnivaError(ErrorCode.EVENT_NOT_FOUND, f"No event {event_id}.")
    if found[0] is not None and _stage_callbacks is not None:
        _stage_callbacks.lock(found[0])
    return (
        Event.objects.select_for_update(of=("self",))
        .select_related("event_type", "leased_by")
        .get(pk=event_id)
    )


def _holder_name(event: Event) -> str | None:
    return event.leased_by.name if event.leased_by_id and event.leased_by else None


def _to_dead_letter(
    event: Event, error: dict[str, Any], now: datetime, *, retry_count: int | None = None
) -> None:
    event.status = EventStatus.DEAD_LETTERED
    event.error = error
    event.lease_token = None
    event.lock_until = None
    event.finished_at = now
    if retry_count is not None:
        event.retry_count = retry_count
    event.save()
    _event_changed(event)
    if event.stage_run_id is not None and _stage_callbacks is not None:
        _stage_callbacks.finished(event.stage_run_id, None, error, _holder_name(event))


def _fence(event: Event, now: datetime, *, lease_token: Any, engine_id: Any, claimant: str) -> None:
    """Refuse (EVENT_LEASE_LOST) a report from anyone but the holder of the event's
    current lease, as far as the report lets the holder be told apart: its lease token
    decides; without one, the engine id it names must be the holder's; without either
    (seed 000's client sends neither), the lease must have been claimed without an
    engine id, with the same key or user (`claimed_by`). Two token-less engines that
    claim anonymously with one key cannot be told apart: give each its own key."""
    if event.status != EventStatus.LEASED or event.lease_expired(now):
        raise OmnivaError(
            ErrorCode.EVENT_LEASE_LOST,
            f"Event {event.pk} is not leased (it is {event.status}"
            + (", its lease ran out" if event.lease_expired(now) else "")
            + ").",
        )
    if lease_token is not None:
        if str(event.lease_token) != str(lease_token):
            raise OmnivaError(
                ErrorCode.EVENT_LEASE_LOST,
                f"The lease token of event {event.pk} is stale; another claim holds it.",
            )
        return
    if engine_id is not None:
        if event.leased_by_id is None or str(event.leased_by_id) != str(engine_id):
            raise OmnivaError(
                ErrorCode.EVENT_LEASE_LOST,
                f"Engine {engine_id} does not hold event {event.pk}; another claim does.",
            )
        return
    if event.leased_by_id is not None:
        raise OmnivaError(
            ErrorCode.EVENT_LEASE_LOST,
            f"Event {event.pk} is held by engine {event.leased_by_id}; a report without its "
            "lease_token must name that engine (engine_id).",
        )
    if event.claimed_by != claimant:
        raise OmnivaError(
            ErrorCode.EVENT_LEASE_LOST,
            f"Event {event.pk} is held by a claim made with another key; send its lease_token.",
        )


def event_update_status(
    *,
    event_id: Any,
    status: str,
    lease_token: Any = None,
    engine_id: Any = None,
    claimant: str = "",
    result: Any = None,
    error: Any = None,
    progress: float | None = None,
) -> Event:
    """An engine's report on an event it holds: `processing` extends the lease,
    `completed` stores the result, `failed` retries after the backoff or dead-letters.
    A report from anyone but the lease's holder (`_fence`: stale token, another engine,
    another key), or on an event not (or no longer) leased, is refused: EVENT_LEASE_LOST.
    So is one on an event past its deadline, which leaves the queue (its job timed out)
    whoever reported: that change is kept, the report is not applied."""
    if status not in REPORT_STATUSES:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"status is one of {', '.join(REPORT_STATUSES)}.",
            details={"status": [f"not one of {', '.join(REPORT_STATUSES)}"]},
        )
    with transaction.atomic():
        event = _locked_event(event_id)
        now = timezone.now()
        if not _expire_if_overdue(event, now):
            _fence(event, now, lease_token=lease_token, engine_id=engine_id, claimant=claimant)
            return _apply_report(event, now, status, result=result, error=error, progress=progress)
    # Outside the transaction: the timeout committed, the report is refused.
    raise OmnivaError(
        ErrorCode.EVENT_LEASE_LOST,
        f"Event {event.pk} passed its deadline (its job timed out); the report is not applied.",
    )


def _apply_report(
    event: Event, now: datetime, status: str, *, result: Any, error: Any, progress: float | None
) -> Event:
    """A fenced report's change, in the caller's transaction."""
    if progress is not None:
        event.progress = progress
    if status == EventStatus.COMPLETED:
        event.status = EventStatus.COMPLETED
        event.result = result
        event.error = None
        event.progress = 100.0
        event.lease_token = None
        event.lock_until = None
        event.finished_at = now
        event.save()
        _event_changed(event)
        if event.stage_run_id is not None and _stage_callbacks is not None:
            _stage_callbacks.finished(event.stage_run_id, result, None, _holder_name(event))
        return event
    if status == "failed":
        failure = _error(error)
        retry_count = event.retry_count + 1
        if retry_count > event.max_retries:
            _to_dead_letter(event, failure, now, retry_count=retry_count)
            return event
        delay = retry_backoff_s(retry_count)
        event.status = EventStatus.PENDING
        event.retry_count = retry_count
        event.error = failure
        event.lease_token = None
        event.lock_until = None
        event.available_at = now + timedelta(seconds=delay)
        event.save()
        _event_changed(event)
        if delay <= 0:
            _notify_claimable(event.engine_type)
        return event
    # processing: the engine is alive and working on it.
    event.lock_until = now + timedelta(seconds=event.lease_s)
    event.save()
    _event_changed(event)
    if progress is not None and event.stage_run_id is not None and _stage_callbacks:
        run_id = event.stage_run_id
        transaction.on_commit(lambda: _stage_progress(run_id, progress))
    return event


def events_report(
    *, reports: list[dict[str, Any]], claimant: str = ""
) -> list[Event | OmnivaError]:
    """An engine's reports on several events (`{"id", "status", "lease_token", "result"?,
    "error"?, "progress"?}` each), applied in order, each by `event_update_status` in a
    transaction of its own: a refused report (stale token, event not leased or unknown)
    changes nothing (one on an event past its deadline still takes it out of the queue)
    and the others still apply. One answer per report, in order: the
    event, or the OmnivaError that refused it. A database that is down fails the whole
    call (the reports before it stay applied)."""
    # One transaction per report, not one for the batch: a batch would hold the locks of
    # several jobs and events at once, taken in the batch's order, and two engines whose
    # batches touch the same jobs in opposite orders would deadlock.
    if len(reports) > MAX_REPORT_BATCH:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"Send at most {MAX_REPORT_BATCH} reports in one request.",
            details={"non_field_errors": [f"more than {MAX_REPORT_BATCH} reports"]},
        )
    answers: list[Event | OmnivaError] = []
    for report in reports:
        try:
            answers.append(
                event_update_status(
                    event_id=report["id"],
                    status=report["status"],
                    lease_token=report.get("lease_token"),
                    engine_id=report.get("engine_id"),
                    claimant=claimant,
                    result=report.get("result"),
                    error=report.get("error"),
                    progress=report.get("progress"),
                )
            )
        except OmnivaError as refused:
            answers.append(refused)
        except (OperationalError, InterfaceError):
            raise
        except Exception:
            # Its transaction rolled back; the other reports are not held hostage.
            logger.exception("the report on event %s failed", report.get("id"))
            answers.append(OmnivaError(ErrorCode.INTERNAL_ERROR, "Internal server error."))
    return answers


def _stage_progress(stage_run_id: int, progress: float) -> None:
    try:
        assert _stage_callbacks is not None
        _stage_callbacks.progress(stage_run_id, progress)
    except Exception:
        logger.exception("progress of stage run %s not recorded", stage_run_id)


def event_requeue(*, event_id: Any) -> Event:
    """Take a dead-lettered event back to the queue with its retries renewed. An event
    whose last lease ran out is dead-lettered first (a claim of its type would have)."""
    with contextlib.suppress(ValueError, TypeError):  # not an id: EVENT_NOT_FOUND below
        _dead_letter_exhausted(timezone.now(), event_id=event_id)
    with transaction.atomic():
        event = _locked_event(event_id)
        if event.status != EventStatus.DEAD_LETTERED:
            raise OmnivaError(
                ErrorCode.CONFLICT,
                f"Event {event.pk} is {event.status}; only dead-lettered events are requeued.",
            )
        if event.stage_run_id is not None:
            # Its stage already ended with it (failed, or its job was cancelled); a
            # retry of the job queues a fresh event, so one stage never has two.
            raise OmnivaError(
                ErrorCode.CONFLICT,
                f"Event {event.pk} ran a job stage that has ended; retry the job instead.",
            )
        now = timezone.now()
        event.status = EventStatus.PENDING
        event.retry_count = 0
        event.available_at = now
        event.finished_at = None
        event.leased_by = None
        event.claimed_by = ""
        event.leased_at = None
        event.deadline = None  # requeued by hand: whatever bound it before is over
        event.progress = 0.0
        event.error = None
        event.result = None
        event.save()
        _event_changed(event)
        _notify_claimable(event.engine_type)
        return event


def event_dead_letter(*, event_id: Any, reason: str = "") -> Event:
    """Move a pending or leased event to the dead letter queue by hand."""
    with transaction.atomic():
        event = _locked_event(event_id)
        if event.status not in (EventStatus.PENDING, EventStatus.LEASED):
            raise OmnivaError(
                ErrorCode.CONFLICT,
                f"Event {event.pk} is {event.status}; only pending or leased events move.",
            )
        error = {
            "code": FailureCode.DEAD_LETTERED,
            "message": reason or "moved to the dead letter queue",
        }
        _to_dead_letter(event, error, timezone.now())
        return event


def events_dead_end_for_stages(*, stage_run_ids: list[int], reason: str) -> int:
    """The orchestrator ended these stages (job cancelled, timed out, failed): their
    unfinished events are dead-lettered and any engine's later report is refused. The
    caller holds the job's lock; nothing is reported back to it."""
    if not stage_run_ids:
        return 0
    now = timezone.now()
    ended = list(
        Event.objects.select_for_update().filter(
            stage_run_id__in=stage_run_ids, status__in=[EventStatus.PENDING, EventStatus.LEASED]
        )
    )
    for event in ended:
        event.status = EventStatus.DEAD_LETTERED
        event.error = {"code": FailureCode.STAGE_ENDED, "message": reason[:2000]}
        event.lease_token = None
        event.lock_until = None
        event.finished_at = now
        event.save()
        _event_changed(event)
    return len(ended)
