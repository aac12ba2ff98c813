"""Engines (external processes that pull work over HTTP) and the leased event queue.

Seed 000's semantics are kept: batches of 3 by default and 10 at most, `lock_until`,
`retry_count`, at most 3 retries after 30, 60 and 120 s, then the dead letter queue.
Time-based states are derived, never swept (DESIGN.md, decision 4): an engine is
offline when its last heartbeat is older than OMNIVA_ENGINE_OFFLINE_AFTER_S, and a
leased event whose `lock_until` passed is claimable again (engines/services/).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, TypeAlias, TypedDict

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

# The NOTIFY channel of new events: an event's creation notifies it with its engine type,
# and engines long-polling for that type wake up (engines/services/).
EVENTS_CHANNEL = "omniva_events"


class EngineStatus(models.TextChoices):
    # Reported by the engine itself on registration and with each heartbeat.
    ACTIVE = "active", "Active"
    IDLE = "idle", "Idle"
    PROCESSING = "processing", "Processing"
    DRAINING = "draining", "Draining"
    # Never stored: derived when no heartbeat came for OMNIVA_ENGINE_OFFLINE_AFTER_S.
    OFFLINE = "offline", "Offline"


REPORTED_ENGINE_STATUSES = (
    EngineStatus.ACTIVE,
    EngineStatus.IDLE,
    EngineStatus.PROCESSING,
    EngineStatus.DRAINING,
)


def offline_before(now: datetime | None = None) -> datetime:
    """Engines whose last heartbeat is older than this are offline."""
    now = now or timezone.now()
    return now - timedelta(seconds=settings.OMNIVA_ENGINE_OFFLINE_AFTER_S)


class EngineInstance(models.Model):
    """A registered engine process. Deregistration deletes the row."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    engine_type = models.CharField(max_length=100, db_index=True)
    # Unique: a name an online engine holds cannot be registered again (409); an
    # offline holder is replaced by the new registration.
    name = models.CharField(max_length=200, unique=True)
    capabilities = models.JSONField(default=list, blank=True)
    resource_limits = models.JSONField(default=dict, blank=True)
    reported_status = models.CharField(
        max_length=20, choices=EngineStatus.choices, default=EngineStatus.ACTIVE
    )
    current_workload = models.PositiveIntegerField(default=0)
    resource_utilization = models.JSONField(default=dict, blank=True)
    last_heartbeat = models.DateTimeField(default=timezone.now, db_index=True)
    registered_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("engine_type", "name")

    def __str__(self) -> str:
        return f"{self.name} ({self.engine_type})"

    def is_online(self, now: datetime | None = None) -> bool:
        return self.last_heartbeat >= offline_before(now)

    @property
    def status(self) -> str:
        return self.reported_status if self.is_online() else EngineStatus.OFFLINE

    @property
    def max_concurrent_events(self) -> int | None:
        value = (self.resource_limits or {}).get("max_concurrent_events")
        return int(value) if value else None


if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

    class HeldEvents(TypedDict):
        held_events: int

    # An engine read through engines.selectors.with_held_events.
    EngineWithHeldEvents: TypeAlias = WithAnnotations[EngineInstance, HeldEvents]


class EventType(models.Model):
    """A kind of work an engine type does; its defaults apply to each new event."""

    name = models.CharField(max_length=100, unique=True)
    engine_type = models.CharField(max_length=100, db_index=True)
    description = models.TextField(blank=True)
    default_priority = models.PositiveSmallIntegerField(default=5)
    max_retries = models.PositiveSmallIntegerField(default=3)
    lease_s = models.PositiveIntegerField(default=300)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class EventStatus(models.TextChoices):
    # Waiting for an engine; claimable once `available_at` passed (a failed attempt's
    # backoff) and while its `deadline` has not passed. Leaves on a claim (→ leased), or
    # when its job is cancelled or times out (→ dead_lettered).
    PENDING = "pending", "Pending"
    # Held by one engine until `lock_until`, fenced by `lease_token`. Leaves when the
    # engine reports completed (→ completed) or failed (→ pending after the backoff, or
    # → dead_lettered after the last retry), when the engine deregisters (→ pending),
    # or when `lock_until` passes: the next claim counts that as a failed attempt and
    # takes it (retry_count + 1), or dead-letters it after the last retry; or when its
    # `deadline` passes (→ dead_lettered, its job timed out).
    LEASED = "leased", "Leased"
    # Done; `result` holds what the engine returned. Final.
    COMPLETED = "completed", "Completed"
    # Out of retries, or its job was cancelled or timed out; `error` says why. Leaves by
    # a requeue (→ pending, retry_count 0).
    DEAD_LETTERED = "dead_lettered", "Dead-lettered"


class Event(models.Model):
    event_type = models.ForeignKey(EventType, on_delete=models.PROTECT, related_name="events")
    # Copied from the event type at creation, so a claim reads one table.
    engine_type = models.CharField(max_length=100)
    priority = models.PositiveSmallIntegerField(default=5)
    data = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=20, choices=EventStatus.choices, default=EventStatus.PENDING
    )
    retry_count = models.PositiveSmallIntegerField(default=0)
    max_retries = models.PositiveSmallIntegerField(default=3)
    lease_s = models.PositiveIntegerField(default=300)
    available_at = models.DateTimeField(default=timezone.now)
    lock_until = models.DateTimeField(null=True, blank=True)
    lease_token = models.UUIDField(null=True, blank=True)
    leased_by = models.ForeignKey(
        EngineInstance,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="leased_events",
    )
    leased_at = models.DateTimeField(null=True, blank=True)
    # Who made the claim that holds the lease: `key:<id>` or `user:<id>`, empty for a
    # call inside Omniva. A report that carries neither the lease token nor an engine id
    # (seed 000's client sends neither) is fenced by it (engines/services/, _fence).
    claimed_by = models.CharField(max_length=64, blank=True, default="")
    # Not handed out after this; past it the event leaves the queue (dead-lettered, its
    # job timed out). Set by the orchestrator for a job stage: the job's deadline.
    deadline = models.DateTimeField(null=True, blank=True)
    progress = models.FloatField(default=0.0)
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    # The job stage this event runs, when it was made by the orchestrator (engines
    # does not import jobs; the id is opaque here).
    stage_run_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    # Its job and that job's project, opaque here too: the event's activity rows carry
    # them, so the job's socket and the project's keys see the event (docs/live.md).
    job_id = models.UUIDField(null=True, blank=True)
    project_id = models.UUIDField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-id",)
        indexes = [
            # The claim: per engine type, highest priority first, then oldest.
            models.Index(
                "engine_type",
                models.F("priority").desc(),
                "id",
                name="engines_event_claim",
                condition=Q(status__in=["pending", "leased"]),
            ),
            # What the claim and `manage.py cleanup` settle: events past their deadline.
            models.Index(
                fields=["deadline"],
                name="engines_event_deadline",
                condition=Q(status__in=["pending", "leased"], deadline__isnull=False),
            ),
            # Retention (oldest finished first, per engine type and status) and the
            # bounded counts of /v1/metrics and /metrics; only finished rows enter it.
            models.Index(
                fields=["engine_type", "status", "finished_at"],
                name="engines_event_finished",
                condition=Q(status__in=["completed", "dead_lettered"]),
            ),
        ]

    def __str__(self) -> str:
        return f"event {self.pk} ({self.event_type_id}, {self.status})"

    def lease_expired(self, now: datetime | None = None) -> bool:
        return (
            self.status == EventStatus.LEASED
            and self.lock_until is not None
            and self.lock_until < (now or timezone.now())
        )
