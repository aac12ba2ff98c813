"""What the event queue's transitions share: its limits, the listener long polls wait on,
the orchestrator's callbacks for events that run job stages, and locking one event.

`register_stage_callbacks` sets the callbacks once, at start-up (jobs' AppConfig.ready);
the other modules read them through `stage_callbacks()`, at call time, so they see
what was registered after they were imported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from engines.models import EVENTS_CHANNEL, Event
from omniva.errors import ErrorCode, FailureCode, OmnivaError
from omniva.notifications import Listener

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


def stage_callbacks() -> StageCallbacks | None:
    """The callbacks registered, or None (engines without jobs: some tests, tools)."""
    return _stage_callbacks


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
