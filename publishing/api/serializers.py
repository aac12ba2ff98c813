from __future__ import annotations

from typing import Any

from rest_framework import serializers

from jobs.api.serializers import PriorityField
from omniva.api.serializers import BoundProjectFields
from omniva.models import Project
from publishing.models import (
    Destination,
    DestinationKind,
    Publication,
    PublicationStatus,
    Schedule,
)

# What each kind cannot publish without (publishing/adapters/).
REQUIRED_CONFIG: dict[str, tuple[str, ...]] = {
    DestinationKind.S3: ("bucket",),
    DestinationKind.PRINTIFY: ("shop_id", "blueprint_id", "print_provider_id", "variants"),
}


class DestinationSerializer(BoundProjectFields, serializers.ModelSerializer):
    """`secrets` are write-only; a response names the ones set (`secret_names`)."""

    project = serializers.PrimaryKeyRelatedField(queryset=Project.objects.all(), required=False)
    config = serializers.DictField(required=False)
    secrets = serializers.DictField(
        child=serializers.CharField(allow_null=True, max_length=4096),
        required=False,
        write_only=True,
    )
    secret_names = serializers.SerializerMethodField()

    class Meta:
        model = Destination
        fields = [
            "id", "project", "name", "kind", "config", "secrets", "secret_names", "active",
            "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = ["id", "created_at", "updated_at"]

    def get_secret_names(self, destination: Destination) -> list[str]:
        return sorted(destination.secrets)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        kind = attrs.get("kind", getattr(self.instance, "kind", None))
        config = attrs.get("config", getattr(self.instance, "config", {}))
        if kind == DestinationKind.WEBHOOK and not isinstance(config.get("url"), str):
            raise serializers.ValidationError({"config": ["A webhook needs `url`."]})
        needed = REQUIRED_CONFIG.get(kind or "", ())
        missing = [name for name in needed if config.get(name) in (None, "", [])]
        if kind == DestinationKind.SHOPIFY and not (config.get("shop") or config.get("api_base")):
            missing.append("shop")
        if missing:
            raise serializers.ValidationError(
                {"config": [f"A {kind} destination needs {', '.join(f'`{m}`' for m in missing)}."]}
            )
        if kind == DestinationKind.DIRECTORY:
            path = config.get("path", ".")
            if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/"):
                raise serializers.ValidationError(
                    {"config": ["`path` must be relative, under the publish root."]}
                )
        return attrs


class PublicationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Publication
        fields = [
            "id", "destination", "clip", "artifact", "status", "external_id", "url",
            "attempts", "error", "published_at", "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = fields


class PublicationFilterSerializer(serializers.Serializer):
    destination = serializers.UUIDField(required=False)
    clip = serializers.UUIDField(required=False)
    status = serializers.ChoiceField(choices=PublicationStatus.choices, required=False)


class ScheduleSerializer(BoundProjectFields, serializers.ModelSerializer):
    """The services check the pipeline, its params and the timing (one error answer)."""

    project = serializers.PrimaryKeyRelatedField(queryset=Project.objects.all(), required=False)
    params = serializers.DictField(required=False)
    priority = PriorityField(required=False)
    cron = serializers.CharField(required=False, allow_blank=True, max_length=100)
    interval_s = serializers.IntegerField(
        required=False, allow_null=True, min_value=60, max_value=366 * 86400
    )
    next_run_at = serializers.DateTimeField(read_only=True, allow_null=True)

    class Meta:
        model = Schedule
        fields = [
            "id", "project", "name", "pipeline", "params", "priority", "cron", "interval_s",
            "active", "next_run_at", "runs", "last_run_at", "last_job_id", "created_at",
            "updated_at",
        ]  # fmt: skip
        read_only_fields = ["id", "runs", "last_run_at", "last_job_id", "created_at", "updated_at"]
