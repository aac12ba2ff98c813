from __future__ import annotations

from typing import Any

from rest_framework import serializers

from omniva.api.serializers import BoundProjectFields
from omniva.models import Project
from publishing.models import Destination, DestinationKind, Publication, PublicationStatus


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
