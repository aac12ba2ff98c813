from __future__ import annotations

from typing import Any

from rest_framework import serializers

from engines.models import (
    REPORTED_ENGINE_STATUSES,
    EngineInstance,
    EngineStatus,
    Event,
    EventStatus,
    EventType,
)
from engines.selectors import held_events_filter
from engines.services import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, MAX_REPORT_BATCH, MAX_WAIT_S
from omniva.api.serializers import FieldsBuiltOnce
from omniva.row_ids import is_row_id

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"


class ResourceLimitsSerializer(serializers.Serializer):
    max_concurrent_events = serializers.IntegerField(required=False, min_value=1, max_value=1000)
    memory_limit_mb = serializers.IntegerField(required=False, min_value=1, max_value=10_000_000)


class EngineRegisterSerializer(serializers.Serializer):
    engine_type = serializers.RegexField(NAME_PATTERN)
    name = serializers.RegexField(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$", required=False)
    capabilities = serializers.ListField(
        child=serializers.CharField(max_length=100), required=False, default=list, max_length=100
    )
    resource_limits = ResourceLimitsSerializer(required=False, default=dict)


class EngineHeartbeatSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=list(REPORTED_ENGINE_STATUSES), required=False)
    current_workload = serializers.IntegerField(required=False, min_value=0, max_value=1_000_000)
    resource_utilization = serializers.DictField(required=False)


class EngineSerializer(serializers.ModelSerializer):
    status = serializers.CharField(read_only=True)
    metadata = serializers.SerializerMethodField()
    held_events = serializers.SerializerMethodField()

    class Meta:
        model = EngineInstance
        fields = [
            "id",
            "engine_type",
            "name",
            "status",
            "last_heartbeat",
            "current_workload",
            "held_events",
            "registered_at",
            "metadata",
        ]

    def get_metadata(self, engine: EngineInstance) -> dict[str, Any]:
        return {
            "static_config": {
                "capabilities": engine.capabilities,
                "resource_limits": engine.resource_limits,
            },
            "dynamic_state": {"resource_utilization": engine.resource_utilization},
        }

    def get_held_events(self, engine: EngineInstance) -> int:
        held = getattr(engine, "held_events", None)
        if held is None:
            held = engine.leased_events.filter(held_events_filter()).count()
        return held


class EngineFilterSerializer(serializers.Serializer):
    engine_type = serializers.CharField(required=False, max_length=100)
    status = serializers.ChoiceField(choices=EngineStatus.choices, required=False)


class EventTypeSerializer(serializers.ModelSerializer):
    name = serializers.RegexField(NAME_PATTERN)
    engine_type = serializers.RegexField(NAME_PATTERN)
    default_priority = serializers.IntegerField(required=False, min_value=0, max_value=10)
    max_retries = serializers.IntegerField(required=False, min_value=0, max_value=10)
    lease_s = serializers.IntegerField(required=False, min_value=1, max_value=86400)

    class Meta:
        model = EventType
        fields = [
            "id",
            "name",
            "engine_type",
            "description",
            "default_priority",
            "max_retries",
            "lease_s",
            "created_at",
        ]
        read_only_fields = ["id", "created_at"]
        extra_kwargs = {"description": {"required": False, "max_length": 2000}}

    def validate_name(self, value: str) -> str:
        # Checked here for a clear field error; the unique constraint covers the race.
        if EventType.objects.filter(name=value).exists():
            raise serializers.ValidationError("An event type with this name exists.")
        return value


class EventCreateSerializer(serializers.Serializer):
    event_type = serializers.CharField(max_length=100)
    priority = serializers.IntegerField(required=False, min_value=0, max_value=10)
    # The API's field is named `data`, as a Serializer's own property is (the stubs object).
    data = serializers.DictField(required=False, default=dict)  # type: ignore[assignment]

    def validate_event_type(self, value: str) -> EventType:
        event_type = EventType.objects.filter(name=value).first()
        if event_type is None and is_row_id(value):
            event_type = EventType.objects.filter(pk=int(value)).first()
        if event_type is None:
            raise serializers.ValidationError(f"No event type {value!r}.")
        return event_type


class EventSerializer(FieldsBuiltOnce, serializers.ModelSerializer):
    event_type = serializers.CharField(source="event_type.name", read_only=True)
    engine_id = serializers.UUIDField(source="leased_by_id", read_only=True, allow_null=True)
    lease_expired = serializers.SerializerMethodField()

    class Meta:
        model = Event
        fields = [
            "id",
            "event_type_id",
            "event_type",
            "engine_type",
            "priority",
            "data",
            "status",
            "lock_until",
            "lease_expired",
            "retry_count",
            "max_retries",
            "available_at",
            "engine_id",
            "progress",
            "result",
            "error",
            "stage_run_id",
            "created_at",
            "updated_at",
            "finished_at",
        ]

    def get_lease_expired(self, event: Event) -> bool:
        return event.lease_expired()


class ClaimedEventSerializer(FieldsBuiltOnce, serializers.ModelSerializer):
    """Seed 000's shape of a claimed event, plus the lease token that fences it."""

    event_type = serializers.SerializerMethodField()

    class Meta:
        model = Event
        fields = [
            "id",
            "event_type_id",
            "event_type",
            "priority",
            "data",
            "lock_until",
            "retry_count",
            "lease_token",
        ]

    def get_event_type(self, event: Event) -> str:
        # The claim statement returns the name with the row (no query per event).
        return getattr(event, "event_type_name", None) or event.event_type.name


class ClaimSerializer(serializers.Serializer):
    engine_type = serializers.RegexField(NAME_PATTERN)
    engine_id = serializers.UUIDField(required=False, allow_null=True)
    batch_size = serializers.IntegerField(
        required=False, default=DEFAULT_BATCH_SIZE, min_value=1, max_value=MAX_BATCH_SIZE
    )
    wait_s = serializers.FloatField(required=False, default=0, min_value=0, max_value=MAX_WAIT_S)


class QueueClaimSerializer(serializers.Serializer):
    """The seed's GET form: the engine type is in the path."""

    engine_id = serializers.UUIDField(required=False, allow_null=True)
    batch_size = serializers.IntegerField(
        required=False, default=DEFAULT_BATCH_SIZE, min_value=1, max_value=MAX_BATCH_SIZE
    )
    wait_s = serializers.FloatField(required=False, default=0, min_value=0, max_value=MAX_WAIT_S)


class EventStatusSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["processing", EventStatus.COMPLETED, "failed"])
    result = serializers.JSONField(required=False, allow_null=True)
    error = serializers.JSONField(required=False, allow_null=True)
    progress = serializers.FloatField(required=False, min_value=0, max_value=100)
    lease_token = serializers.UUIDField(
        required=False,
        allow_null=True,
        help_text="The token the claim returned; a report without it is fenced by engine_id, "
        "or else by the key that claimed (seed 000's clients send neither).",
    )
    engine_id = serializers.UUIDField(
        required=False,
        allow_null=True,
        help_text="The engine that claimed the event (the claim's engine_id); without a "
        "lease_token, a report from an engine that does not hold the lease is refused.",
    )

    def validate_error(self, value: Any) -> Any:
        if value is not None and not isinstance(value, str | dict):
            raise serializers.ValidationError("Give a message or an object {code, message}.")
        return value


class EventReportListSerializer(serializers.ListSerializer):
    """A batch of reports: a list of 1 to MAX_REPORT_BATCH items. Item errors come keyed
    by the item's position (`{"2": {"status": [...]}}`), not as a list of empty objects."""

    default_error_messages = {
        "not_a_list": "Send a JSON list of reports, not {input_type}.",
        "empty": "Send at least one report.",
        "max_length": "Send at most {max_length} reports in one request.",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_empty", False)
        kwargs.setdefault("max_length", MAX_REPORT_BATCH)
        super().__init__(*args, **kwargs)

    def run_validation(self, data: Any = serializers.empty) -> Any:
        try:
            return super().run_validation(data)
        except serializers.ValidationError as invalid:
            if not isinstance(invalid.detail, list):
                raise
            errors = {str(i): item for i, item in enumerate(invalid.detail) if item}
            raise serializers.ValidationError(errors) from None


class EventReportSerializer(EventStatusSerializer):
    """One report of a batch: the single report's fields, the event's id, and its lease
    token, which a batch item must carry (each is fenced on its own)."""

    id = serializers.IntegerField(min_value=1, max_value=2**63 - 1)
    # The single report's choices, described (which also names their schema enum apart).
    status = serializers.ChoiceField(
        choices=[
            ("processing", "still working: extends the lease, records progress"),
            (EventStatus.COMPLETED, "done: stores the result"),
            ("failed", "retried after the backoff, or dead-lettered after the last retry"),
        ]
    )
    lease_token = serializers.UUIDField()

    class Meta:
        list_serializer_class = EventReportListSerializer


class EventReportErrorSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="The single report's code, e.g. EVENT_LEASE_LOST.")
    message = serializers.CharField()
    details = serializers.DictField(required=False)


class EventReportAnswerSerializer(serializers.Serializer):
    """The answer to one report of a batch: the event, or why it was refused."""

    id = serializers.IntegerField(help_text="The event the report named.")
    ok = serializers.BooleanField(help_text="Whether the report was applied.")
    event = EventSerializer(required=False, help_text="The event after the report (ok).")
    error = EventReportErrorSerializer(
        required=False, help_text="Why the report was refused; nothing changed (not ok)."
    )


class EventFilterSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=EventStatus.choices, required=False)
    event_type = serializers.CharField(required=False, max_length=100)
    engine_type = serializers.CharField(required=False, max_length=100)
