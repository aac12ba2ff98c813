from __future__ import annotations

import copy
from typing import Any

from rest_framework import serializers

from omniva.models import AuditRecord, Clip, ClipStatus, Creator, Project


class FieldsBuiltOnce:
    """For a ModelSerializer on a hot read path (a job, an event): its fields are built
    from the model once per class and copied for each instance. Building them is most of
    DRF's cost: a job with its stages takes 2.4 ms to serialize that way, 0.9 ms this
    way (docs/benchmarks.md). Only for serializers whose fields do not depend on the
    instance or the context."""

    def get_fields(self) -> dict[str, Any]:
        cls = type(self)
        prototype = cls.__dict__.get("_fields_prototype")
        if prototype is None:
            prototype = super().get_fields()  # type: ignore[misc]
            cls._fields_prototype = prototype  # type: ignore[attr-defined]
        return {name: _fresh_copy(field) for name, field in prototype.items()}


def _fresh_copy(field: serializers.Field) -> serializers.Field:
    """A field made again from the arguments it was made with (what DRF's deepcopy of a
    field does, without deep-copying the arguments: they are only read). A nested
    serializer is deep-copied: its child must not be shared between two parents."""
    if isinstance(field, serializers.BaseSerializer):
        return copy.deepcopy(field)
    # Field.__new__ keeps them; the stubs do not declare them.
    args, kwargs = field._args, field._kwargs  # type: ignore[attr-defined]
    return field.__class__(*args, **kwargs)


class ProjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = ["id", "name", "description", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        # Uniqueness is the service's to check, inside its transaction.
        extra_kwargs: dict[str, dict[str, Any]] = {"name": {"validators": []}}


class BoundProjectFields:
    """A key bound to a project names only its own project and creators."""

    context: dict[str, Any]

    def get_fields(self) -> dict[str, Any]:
        fields = super().get_fields()  # type: ignore[misc]
        bound = self.context.get("bound_project")
        if bound is not None:
            for name, model in (("project", Project), ("creator", Creator)):
                if name in fields:
                    own = {"pk": bound.pk} if model is Project else {"project": bound}
                    fields[name].queryset = model.objects.filter(**own)
        return fields


class CreatorSerializer(BoundProjectFields, serializers.ModelSerializer):
    project = serializers.PrimaryKeyRelatedField(queryset=Project.objects.all(), required=False)

    class Meta:
        model = Creator
        fields = [
            "id", "project", "name", "handle", "platform", "source_url", "active",
            "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = ["id", "created_at", "updated_at"]


class ClipSerializer(BoundProjectFields, serializers.ModelSerializer):
    project = serializers.PrimaryKeyRelatedField(queryset=Project.objects.all(), required=False)
    creator = serializers.PrimaryKeyRelatedField(
        queryset=Creator.objects.all(), required=False, allow_null=True
    )
    duration_s = serializers.FloatField(required=False, allow_null=True, min_value=0)

    class Meta:
        model = Clip
        fields = [
            "id", "project", "creator", "title", "source_url", "media_url", "duration_s",
            "transcript", "status", "analysis", "embedded_at", "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = ["id", "embedded_at", "created_at", "updated_at"]
        # One clip per project and source: clip_create answers CONFLICT (the project may
        # be the key's own, which DRF's constraint validator cannot know).
        validators: list[Any] = []


class ContentFilterSerializer(serializers.Serializer):
    project = serializers.UUIDField(required=False)
    creator = serializers.UUIDField(required=False)
    status = serializers.ChoiceField(choices=ClipStatus.choices, required=False)


class ClipMatchSerializer(serializers.Serializer):
    """A clip found by semantic search, with its cosine similarity (1 is identical)."""

    score = serializers.FloatField()
    clip = ClipSerializer()


class ClipSearchParamsSerializer(serializers.Serializer):
    q = serializers.CharField(max_length=2000)
    project = serializers.UUIDField(required=False)
    limit = serializers.IntegerField(min_value=1, max_value=100, default=10)


class ClipSimilarParamsSerializer(serializers.Serializer):
    limit = serializers.IntegerField(min_value=1, max_value=100, default=10)


class AuditRecordSerializer(serializers.ModelSerializer):
    key = serializers.CharField(source="key_name", read_only=True)
    user = serializers.SerializerMethodField()

    class Meta:
        model = AuditRecord
        fields = [
            "id", "request_id", "at", "key", "user", "method", "path", "status",
            "duration_ms", "remote_addr", "entity_ids",
        ]  # fmt: skip

    def get_user(self, record: AuditRecord) -> str | None:
        return record.user.get_username() if record.user is not None else None


class AuditFilterSerializer(serializers.Serializer):
    request_id = serializers.CharField(required=False, max_length=128)
    path = serializers.CharField(required=False, max_length=2000)
    status = serializers.IntegerField(required=False, min_value=100, max_value=599)
    key = serializers.CharField(required=False, max_length=100)


class HealthSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["healthy", "degraded", "unhealthy"])
    version = serializers.CharField()
    uptime_s = serializers.FloatField()
    checks = serializers.DictField(child=serializers.DictField())
    metrics = serializers.DictField()


class InfoSerializer(serializers.Serializer):
    name = serializers.CharField()
    version = serializers.CharField()
    config = serializers.DictField()


class MetricsSerializer(serializers.Serializer):
    jobs = serializers.DictField()
    queues = serializers.DictField(child=serializers.DictField())
    workers = serializers.DictField()
    api = serializers.DictField()
    last_activity = serializers.DateTimeField(allow_null=True)
    uptime_s = serializers.FloatField()
