from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from jobs import selectors, services
from jobs.models import PRIORITY_WORDS, Job, JobLog, JobStatus, StageRun
from omniva.api.serializers import FieldsBuiltOnce
from omniva.errors import OmnivaError

MAX_TIMEOUT_S = 7 * 86400


@extend_schema_field(
    {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"enum": list(PRIORITY_WORDS)}]}
)
class PriorityField(serializers.Field):
    """0-10, or one of the words low (2), normal (5), high (8), urgent (10)."""

    default_error_messages = {"invalid": "Give 0-10 or one of low, normal, high, urgent."}

    def to_internal_value(self, data: Any) -> int:
        try:
            return services.parse_priority(data)  # the one rule, as gRPC and the CLI get it
        except OmnivaError:
            self.fail("invalid")

    def to_representation(self, value: int) -> int:
        return value


class ParamsField(serializers.JSONField):
    default_error_messages = {"not_object": "params must be a JSON object."}

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        value = super().to_internal_value(data)
        if not isinstance(value, dict):
            self.fail("not_object")
        return value


class JobSubmitSerializer(FieldsBuiltOnce, serializers.Serializer):
    pipeline = serializers.CharField(max_length=100)
    params = ParamsField(required=False, default=dict)
    priority = PriorityField(required=False, default=5)
    max_retries = serializers.IntegerField(required=False, min_value=0, max_value=10)
    timeout_s = serializers.IntegerField(required=False, min_value=1, max_value=MAX_TIMEOUT_S)
    queue_timeout_s = serializers.IntegerField(required=False, min_value=1, max_value=MAX_TIMEOUT_S)
    project = serializers.UUIDField(required=False, allow_null=True)
    idempotency_key = serializers.CharField(required=False, max_length=200, allow_blank=False)
    sync = serializers.BooleanField(required=False, default=False)
    sync_timeout_s = serializers.FloatField(required=False, default=30, min_value=0, max_value=300)


class BatchItemSerializer(serializers.Serializer):
    pipeline = serializers.CharField(max_length=100)
    params = ParamsField(required=False, default=dict)
    priority = PriorityField(required=False)


class JobBatchSerializer(serializers.Serializer):
    # many=True hands max_length to the ListSerializer it makes (the stubs miss it).
    items = BatchItemSerializer(many=True, allow_empty=False, max_length=1000)  # type: ignore[call-arg]
    priority = PriorityField(required=False)
    max_retries = serializers.IntegerField(required=False, min_value=0, max_value=10)
    project = serializers.UUIDField(required=False, allow_null=True)
    idempotency_key = serializers.CharField(required=False, max_length=200, allow_blank=False)


class JobCancelSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")


class JobCleanupSerializer(serializers.Serializer):
    max_age_s = serializers.IntegerField(
        required=False, default=86400, min_value=0, max_value=services.CLEANUP_MAX_AGE_S
    )
    statuses = serializers.ListField(
        child=serializers.ChoiceField(
            choices=[
                JobStatus.COMPLETED,
                JobStatus.FAILED,
                JobStatus.CANCELLED,
                JobStatus.TIMED_OUT,
            ]
        ),
        required=False,
        allow_empty=False,
    )


class JobFilterSerializer(serializers.Serializer):
    status = serializers.MultipleChoiceField(choices=JobStatus.choices, required=False)
    pipeline = serializers.CharField(required=False, max_length=100)
    project = serializers.UUIDField(required=False)
    # The API's filter is named `parent`, as a Field's own attribute is (the stubs object).
    parent = serializers.UUIDField(required=False)  # type: ignore[assignment]
    priority_min = serializers.IntegerField(required=False, min_value=0, max_value=10)
    created_after = serializers.DateTimeField(required=False)
    created_before = serializers.DateTimeField(required=False)


class StageRunSerializer(FieldsBuiltOnce, serializers.ModelSerializer):
    queue = serializers.SerializerMethodField()
    engine_type = serializers.SerializerMethodField()

    class Meta:
        model = StageRun
        fields = [
            "name", "status", "attempt", "queue", "engine_type", "worker", "progress",
            "started_at", "finished_at", "duration_ms", "error",
        ]  # fmt: skip

    def get_queue(self, run: StageRun) -> str | None:
        return run.queue or None

    def get_engine_type(self, run: StageRun) -> str | None:
        return run.engine_type or None

    def to_representation(self, run: StageRun) -> dict[str, Any]:
        # Written out: what DRF's fields render, without running them (a job's read
        # renders every stage; tests/omniva/test_fields_built_once.py compares the two).
        return {
            "name": run.name,
            "status": run.status,
            "attempt": run.attempt,
            "queue": run.queue or None,
            "engine_type": run.engine_type or None,
            "worker": run.worker,
            "progress": run.progress,
            "started_at": iso_datetime(run.started_at),
            "finished_at": iso_datetime(run.finished_at),
            "duration_ms": run.duration_ms,
            "error": run.error,
        }


class JobSerializer(FieldsBuiltOnce, serializers.ModelSerializer):
    stages = StageRunSerializer(many=True, read_only=True)
    progress = serializers.SerializerMethodField()
    estimated_completion_ms = serializers.SerializerMethodField()

    class Meta:
        model = Job
        fields = [
            "id", "pipeline", "status", "priority", "progress", "params", "result", "error",
            "attempts", "max_retries", "timeout_s", "queue_timeout_s", "project", "parent",
            "idempotency_key", "created_at", "started_at", "finished_at", "next_attempt_at",
            "queue_time_ms", "run_time_ms", "cancel_reason", "estimated_completion_ms", "stages",
        ]  # fmt: skip

    @extend_schema_field(OpenApiTypes.FLOAT)
    def get_progress(self, job: Job) -> float:
        if job.pipeline == "batch" and not job.is_finished:
            return selectors.batch_progress(job)
        return job.progress

    @extend_schema_field({"type": "integer", "nullable": True})
    def get_estimated_completion_ms(self, job: Job) -> int | None:
        if not self.context.get("with_estimate"):
            return None
        return selectors.estimated_completion_ms(job)

    def to_representation(self, job: Job) -> dict[str, Any]:
        # Written out, as StageRunSerializer's: the most read representation of the API
        # costs a fifth of what running DRF's fields does (docs/benchmarks.md).
        data: dict[str, Any] = {
            "id": str(job.id),
            "pipeline": job.pipeline,
            "status": job.status,
            "priority": job.priority,
            "progress": self.get_progress(job),
            "params": job.params,
            "result": job.result,
            "error": job.error,
            "attempts": job.attempts,
            "max_retries": job.max_retries,
            "timeout_s": job.timeout_s,
            "queue_timeout_s": job.queue_timeout_s,
            "project": job.project_id,
            "parent": job.parent_id,
            "idempotency_key": job.idempotency_key,
            "created_at": iso_datetime(job.created_at),
            "started_at": iso_datetime(job.started_at),
            "finished_at": iso_datetime(job.finished_at),
            "next_attempt_at": iso_datetime(job.next_attempt_at),
            "queue_time_ms": job.queue_time_ms,
            "run_time_ms": job.run_time_ms,
            "cancel_reason": job.cancel_reason,
        }
        if not job.is_finished and self.context.get("with_estimate"):
            data["estimated_completion_ms"] = selectors.estimated_completion_ms(job)
        # `stage_list`: the stages a selector read with the job (job_for_caller).
        runs = getattr(job, "stage_list", None)
        if runs is None:
            runs = job.stages.all()
        data["stages"] = [_STAGE.to_representation(run) for run in runs]
        return data


_STAGE = StageRunSerializer()


def iso_datetime(moment: datetime | None) -> str | None:
    """A time as DRF's DateTimeField renders it in UTC (ISO 8601, `Z`)."""
    if moment is None:
        return None
    text = moment.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class JobLogSerializer(FieldsBuiltOnce, serializers.ModelSerializer):
    class Meta:
        model = JobLog
        fields = ["at", "level", "stage", "message"]


class PipelineStageSerializer(serializers.Serializer):
    name = serializers.CharField()
    depends_on = serializers.ListField(child=serializers.CharField())
    queue = serializers.CharField(allow_null=True)
    engine_type = serializers.CharField(allow_null=True)


class PipelineSerializer(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    params_schema = serializers.DictField()
    stages = PipelineStageSerializer(many=True)


class CleanupResultSerializer(serializers.Serializer):
    cleared = serializers.IntegerField()
