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

The transitions live in modules by what they are about (core, activity, registration,
events, reports, expiry, deadletter, retention); this package re-exports them, so callers
write `from engines import services` and `services.event_create(...)`.
"""

from __future__ import annotations

from engines.services.core import (
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_SIZE,
    MAX_REPORT_BATCH,
    MAX_WAIT_S,
    REPORT_STATUSES,
    StageCallbacks,
    listener,
    register_stage_callbacks,
    retry_backoff_s,
)
from engines.services.deadletter import (
    event_dead_letter,
    event_requeue,
    events_dead_end_for_stages,
    events_dead_letter_exhausted,
)
from engines.services.events import (
    CLAIM_SQL,
    event_create,
    event_type_create,
    event_type_for_engine,
    events_claim,
    events_claim_now,
)
from engines.services.expiry import events_deadline_set, events_expire_overdue
from engines.services.registration import (
    _engine as _engine,  # not public: engines/api/views.py reads an engine through it
)
from engines.services.registration import engine_deregister, engine_heartbeat, engine_register
from engines.services.reports import event_update_status, events_report
from engines.services.retention import events_prune

__all__ = [
    "CLAIM_SQL",
    "DEFAULT_BATCH_SIZE",
    "MAX_BATCH_SIZE",
    "MAX_REPORT_BATCH",
    "MAX_WAIT_S",
    "REPORT_STATUSES",
    "StageCallbacks",
    "engine_deregister",
    "engine_heartbeat",
    "engine_register",
    "event_create",
    "event_dead_letter",
    "event_requeue",
    "event_type_create",
    "event_type_for_engine",
    "event_update_status",
    "events_claim",
    "events_claim_now",
    "events_dead_end_for_stages",
    "events_dead_letter_exhausted",
    "events_deadline_set",
    "events_expire_overdue",
    "events_prune",
    "events_report",
    "listener",
    "register_stage_callbacks",
    "retry_backoff_s",
]
