"""An engine's reports on the events it holds, fenced (`_fence`) so only the holder of
the current lease is heard, one at a time or in a batch."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db import InterfaceError, OperationalError, transaction
from django.utils import timezone

from engines.models import Event, EventStatus
from engines.services.activity import _event_changed, _notify_claimable
from engines.services.core import (
    MAX_REPORT_BATCH,
    REPORT_STATUSES,
    _error,
    _locked_event,
    logger,
    retry_backoff_s,
    stage_callbacks,
)
from engines.services.deadletter import _holder_name, _to_dead_letter
from engines.services.expiry import _expire_if_overdue
from omniva.errors import ErrorCode, OmnivaError


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
        callbacks = stage_callbacks()
        if event.stage_run_id is not None and callbacks is not None:
            callbacks.finished(event.stage_run_id, result, None, _holder_name(event))
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
    if progress is not None and event.stage_run_id is not None and stage_callbacks():
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
        callbacks = stage_callbacks()
        assert callbacks is not None
        callbacks.progress(stage_run_id, progress)
    except Exception:
        logger.exception("progress of stage run %s not recorded", stage_run_id)
