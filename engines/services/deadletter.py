"""The dead letter queue: an event whose last allowed lease ran out, one moved by hand,
the events of stages the orchestrator ended, and a requeue by hand."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from engines.models import Event, EventStatus
from engines.services.activity import _event_changed, _notify_claimable
from engines.services.core import _locked_event, stage_callbacks
from omniva.errors import ErrorCode, FailureCode, OmnivaError


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
    callbacks = stage_callbacks()
    if event.stage_run_id is not None and callbacks is not None:
        callbacks.finished(event.stage_run_id, None, error, _holder_name(event))


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
    callbacks = stage_callbacks()
    acted = 0
    for event_id, stage_run_id in candidates.values_list("id", "stage_run_id")[:50]:
        with transaction.atomic():
            if stage_run_id is not None and callbacks is not None:
                callbacks.lock(stage_run_id)
            event = Event.objects.select_for_update(skip_locked=True).filter(pk=event_id).first()
            if event is not None and act(event):
                acted += 1
    return acted


def events_dead_letter_exhausted() -> int:
    """Dead-letter every event whose last allowed lease ran out, of every engine type.
    A claim of the type does it for its own (nothing else sweeps); this is for when no
    engine of a type claims any more (`manage.py cleanup`)."""
    moved = 0
    while batch := _dead_letter_exhausted(timezone.now()):
        moved += batch
    return moved


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
