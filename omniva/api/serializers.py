from __future__ import annotations

from rest_framework import serializers

from omniva.models import AuditRecord, Project


class ProjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = Project
        fields = ["id", "name", "description", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        # Uniqueness is the service's to check, inside its transaction.
        extra_kwargs = {"name": {"validators": []}}


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
        return record.user.get_username() if record.user_id else None


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
