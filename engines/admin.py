"""The admin: engines and events are inspected there and changed only through the services.

As in jobs/admin.py, nothing here writes an engine or an event itself. Their pages are
view-only (engines and the claim write these rows all the time, and a form save would
write back a stale copy); the actions call `engine_deregister`, `event_requeue` and
`event_dead_letter` once per selected row and report what each one said.

An engine's status is derived: offline when its last heartbeat is older than
OMNIVA_ENGINE_OFFLINE_AFTER_S, whatever it last reported (engines/models.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from engines import services
from engines.models import EngineInstance, EngineStatus, Event, EventType
from engines.selectors import with_held_events
from omniva.errors import OmnivaError
from omniva.row_ids import row_id

if TYPE_CHECKING:
    from engines.models import EngineWithHeldEvents

# At most this many outcomes of each kind are listed one by one after an action; the
# rest are counted.
MAX_MESSAGES = 10
# A long utilization report is cut to this many characters in the list.
MAX_UTILIZATION_CHARS = 100


# --- formatting, shared with `manage.py engines` --------------------------------------


def engine_status(engine: EngineInstance, now: datetime | None = None) -> str:
    """The derived status, at `now` (one clock for a whole listing)."""
    return str(engine.reported_status if engine.is_online(now) else EngineStatus.OFFLINE)


def heartbeat_age_s(engine: EngineInstance, now: datetime | None = None) -> int:
    # A heartbeat from a clock slightly ahead of ours is "0 s ago", not negative.
    return max(0, int(((now or timezone.now()) - engine.last_heartbeat).total_seconds()))


def format_age(seconds: int) -> str:
    """`12 s ago`, `5 min 3 s ago`, `2 h 5 min ago`, `3 d 4 h ago`."""
    if seconds < 60:
        return f"{seconds} s ago"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min ago"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h ago"


_UNITS = {"_percent": "%", "_pct": "%", "_mb": " MB", "_gb": " GB"}
_NAMES = {"memory": "mem"}


def _utilization_item(key: str, value: Any) -> str:
    name, unit = key, ""
    for suffix, suffix_unit in _UNITS.items():
        if key.endswith(suffix):
            name, unit = key[: -len(suffix)], suffix_unit
            break
    name = name.removesuffix("_usage").removesuffix("_used")
    name = " ".join(_NAMES.get(part, part) for part in name.split("_") if part)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{name or key} {value}"
    return f"{name or key} {value:.0f}{unit}"


def format_utilization(utilization: dict[str, Any] | None) -> str:
    """`cpu 45%, mem 512 MB` from `{"cpu_percent": 45.2, "memory_usage_mb": 512}`; keys
    the engine made up are shown as they came. `-` when it reported none."""
    if not isinstance(utilization, dict) or not utilization:
        return "-"
    # jsonb does not keep the order the engine sent; sort for a stable column.
    text = ", ".join(_utilization_item(key, utilization[key]) for key in sorted(utilization))
    if len(text) > MAX_UTILIZATION_CHARS:
        return text[: MAX_UTILIZATION_CHARS - 1] + "…"
    return text


# --- actions ---------------------------------------------------------------------------


def _report(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    ids: list[Any],
    call: Callable[[Any], str],
    refused: Callable[[Any, OmnivaError], str],
) -> None:
    """Call the service for each id; report what each call said (successes first)."""
    done: list[str] = []
    refusals: list[str] = []
    for pk in ids:
        try:
            done.append(call(pk))
        except OmnivaError as exc:
            refusals.append(refused(pk, exc))
    for level, texts in ((messages.SUCCESS, done), (messages.ERROR, refusals)):
        for text in texts[:MAX_MESSAGES]:
            modeladmin.message_user(request, text, level)
        if len(texts) > MAX_MESSAGES:
            more = len(texts) - MAX_MESSAGES
            verb = "done" if level == messages.SUCCESS else "refused"
            modeladmin.message_user(request, f"… and {more} more {verb}.", level)


def _events(count: int) -> str:
    return f"{count} event" if count == 1 else f"{count} events"


class _ViewOnlyAdmin(admin.ModelAdmin):
    """A row's page is view-only and there is no add or delete page; the model-level
    change and delete permissions gate the actions, which call the services."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        if obj is not None:
            return False
        return super().has_delete_permission(request)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # a bulk ORM delete skips the services
        return actions


@admin.register(EngineInstance)
class EngineInstanceAdmin(_ViewOnlyAdmin):
    """Engines register and heartbeat over HTTP; here they are watched and deregistered."""

    list_display = [
        "name",
        "engine_type",
        "status",
        "last_heartbeat_age",
        "current_workload",
        "held_events",
        "utilization",
    ]
    list_filter = ["engine_type"]
    search_fields = ["name"]
    list_per_page = 50
    fields = (
        "id",
        "name",
        "engine_type",
        "status",
        "reported_status",
        "last_heartbeat",
        "last_heartbeat_age",
        "current_workload",
        "held_events",
        "utilization",
        "resource_utilization",
        "capabilities",
        "resource_limits",
        "registered_at",
    )
    readonly_fields = fields
    actions = ["deregister"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[EngineInstance]:
        return with_held_events(super().get_queryset(request))

    @admin.display(description="status")
    def status(self, engine: EngineInstance) -> str:
        return engine_status(engine)

    @admin.display(description="last heartbeat", ordering="-last_heartbeat")
    def last_heartbeat_age(self, engine: EngineInstance) -> str:
        return format_age(heartbeat_age_s(engine))

    @admin.display(description="held events", ordering="held_events")
    def held_events(self, engine: EngineWithHeldEvents) -> int:
        return engine.held_events

    @admin.display(description="utilization")
    def utilization(self, engine: EngineInstance) -> str:
        return format_utilization(engine.resource_utilization)

    @admin.action(
        description="Deregister the selected engines (their events go back to the queue)",
        permissions=["delete"],
    )
    def deregister(self, request: HttpRequest, queryset: QuerySet[EngineInstance]) -> None:
        names = dict(queryset.order_by("name").values_list("pk", "name"))

        def deregister(engine_id: Any) -> str:
            released = services.engine_deregister(engine_id=engine_id)
            return f"Deregistered {names[engine_id]}; {_events(released)} went back to the queue."

        _report(
            self,
            request,
            list(names),
            deregister,
            lambda engine_id, exc: f"{names[engine_id]}: {exc.code}: {exc.message}",
        )


@admin.register(EventType)
class EventTypeAdmin(admin.ModelAdmin):
    list_display = ["name", "engine_type", "default_priority", "max_retries", "lease_s"]
    readonly_fields = ["created_at"]


@admin.register(Event)
class EventAdmin(_ViewOnlyAdmin):
    """Events are made through the API and by the orchestrator, and moved by engines;
    here they are watched, requeued from the dead letter queue or moved to it."""

    list_display = [
        "id",
        "event_type",
        "engine_type",
        "status_display",
        "priority",
        "retries",
        "lock_until",
        "leased_by",
        "stage_run_id",
        "created_at",
    ]
    list_filter = ["status", "engine_type", "event_type"]
    list_select_related = ["event_type", "leased_by"]
    search_fields = ["id"]  # shows the search box; get_search_results does the matching
    search_help_text = "An event id (exact)."
    show_full_result_count = False  # counting a large events table on every page is slow
    list_per_page = 50
    fieldsets = [
        (
            None,
            {"fields": ["id", "event_type", "engine_type", "priority", "data", "stage_run_id"]},
        ),
        (
            "State",
            {"fields": ["status", "retries", "progress", "result", "error"]},
        ),
        (
            "Lease",
            {"fields": ["leased_by", "leased_at", "lock_until", "lease_token", "lease_s"]},
        ),
        (
            "Times",
            {"fields": ["available_at", "created_at", "updated_at", "finished_at"]},
        ),
    ]
    readonly_fields = [
        "id",
        "event_type",
        "engine_type",
        "priority",
        "data",
        "stage_run_id",
        "status",
        "retries",
        "progress",
        "result",
        "error",
        "leased_by",
        "leased_at",
        "lock_until",
        "lease_token",
        "lease_s",
        "available_at",
        "created_at",
        "updated_at",
        "finished_at",
    ]
    actions = ["requeue", "dead_letter"]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Event], search_term: str
    ) -> tuple[QuerySet[Event], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        pk = row_id(term)
        if pk is None:
            return queryset.none(), False
        return queryset.filter(pk=pk), False

    @admin.display(description="status", ordering="status")
    def status_display(self, event: Event) -> str:
        # Nothing sweeps a lease that ran out: the next claim takes the event (models.py).
        if event.lease_expired():
            return f"{event.status} (lease expired)"
        return str(event.status)

    @admin.display(description="retries")
    def retries(self, event: Event) -> str:
        return f"{event.retry_count}/{event.max_retries}"

    @admin.action(
        description="Requeue the selected events (dead-lettered ones)", permissions=["change"]
    )
    def requeue(self, request: HttpRequest, queryset: QuerySet[Event]) -> None:
        def requeue(event_id: Any) -> str:
            services.event_requeue(event_id=event_id)
            return f"Event {event_id} requeued."

        _report(self, request, _ids(queryset), requeue, _event_refused)

    @admin.action(
        description="Move the selected events to the dead letter queue", permissions=["change"]
    )
    def dead_letter(self, request: HttpRequest, queryset: QuerySet[Event]) -> None:
        reason = f"moved to the dead letter queue in the admin by {request.user}"

        def dead_letter(event_id: Any) -> str:
            services.event_dead_letter(event_id=event_id, reason=reason)
            return f"Event {event_id} moved to the dead letter queue."

        _report(self, request, _ids(queryset), dead_letter, _event_refused)


def _ids(queryset: QuerySet[Event]) -> list[int]:
    return list(queryset.order_by("id").values_list("pk", flat=True))


def _event_refused(event_id: Any, exc: OmnivaError) -> str:
    return f"Event {event_id}: {exc.code}: {exc.message}"
