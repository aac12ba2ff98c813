"""Deadlines: an event past its deadline leaves the queue (a job stage's through the
orchestrator, which times its job out), whoever meets it first."""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone

from engines.models import Event, EventStatus
from engines.services.core import stage_callbacks
from engines.services.deadletter import _each_locked, _to_dead_letter
from omniva.errors import FailureCode


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
    callbacks = stage_callbacks()
    if event.stage_run_id is not None and callbacks is not None:
        ended = callbacks.expire(event.stage_run_id)
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
