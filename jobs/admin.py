"""The admin: jobs are inspected there and cancelled, retried or deleted through the services.

Nothing here writes a job itself. A job's page is view-only (the orchestrator in
jobs/services/ is the only writer of its fields, and a form save would write back a
stale copy of a row a worker is changing); the actions call `job_cancel`, `job_retry`
and `job_delete` once per selected job and report what each one said.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from jobs import services
from jobs.models import Job, JobLog, QueueTask, StageRun
from jobs.selectors import format_duration, run_time_ms
from omniva.errors import OmnivaError

# At most this many refusals are listed one by one after an action; the rest are counted.
MAX_ERROR_MESSAGES = 10


class _ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class StageRunInline(_ReadOnlyInline):
    model = StageRun
    fields = (
        "name",
        "status",
        "attempt",
        "queue",
        "engine_type",
        "worker",
        "progress",
        "started_at",
        "finished_at",
        "duration",
        "error",
    )
    readonly_fields = fields
    ordering = ["position"]

    @admin.display(description="duration")
    def duration(self, run: StageRun) -> str:
        return format_duration(run.duration_ms)


class JobLogInline(_ReadOnlyInline):
    model = JobLog
    fields = ("at", "level", "stage", "message")
    readonly_fields = fields
    ordering = ["id"]
    verbose_name_plural = "log"


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    """Jobs are submitted through the API or `manage.py submit`; here they are watched,
    cancelled, retried and deleted, each through its service function."""

    list_display = [
        "id",
        "pipeline",
        "status",
        "priority",
        "progress_percent",
        "attempts",
        "created_at",
        "run_time",
    ]
    list_filter = ["status", "pipeline", "priority", "project"]
    search_fields = ["id"]  # shows the search box; get_search_results does the matching
    search_help_text = "A job id (exact) or an idempotency key (exact)."
    show_full_result_count = False  # counting a large jobs table on every page is slow
    list_per_page = 50
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "id",
                    "pipeline",
                    "project",
                    "parent",
                    "params",
                    "priority",
                    "idempotency_key",
                ]
            },
        ),
        (
            "State",
            {
                "fields": [
                    "status",
                    "progress",
                    "attempts",
                    "result",
                    "error",
                    "cancel_requested_at",
                    "cancel_reason",
                    "next_attempt_at",
                ]
            },
        ),
        ("Limits", {"fields": ["max_retries", "timeout_s", "queue_timeout_s"]}),
        (
            "Times",
            {
                "fields": [
                    "created_at",
                    "pending_since",
                    "started_at",
                    "finished_at",
                    "updated_at",
                    "queue_time",
                    "run_time",
                ]
            },
        ),
    ]
    # Everything: the page is a view of the row; its transitions are the actions.
    readonly_fields = [
        "id",
        "pipeline",
        "project",
        "parent",
        "params",
        "priority",
        "idempotency_key",
        "status",
        "progress",
        "attempts",
        "result",
        "error",
        "cancel_requested_at",
        "cancel_reason",
        "next_attempt_at",
        "max_retries",
        "timeout_s",
        "queue_timeout_s",
        "created_at",
        "pending_since",
        "started_at",
        "finished_at",
        "updated_at",
        "queue_time",
        "run_time",
    ]
    inlines = [StageRunInline, JobLogInline]
    actions = ["cancel_jobs", "retry_jobs", "delete_jobs"]

    # --- permissions ---------------------------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # A job's own page is view-only; the model-level permission gates the actions.
        if obj is not None:
            return False
        return super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        # Django's delete view would delete the row without the service's guard (an active
        # job) and without its files; the model-level permission gates the delete action.
        if obj is not None:
            return False
        return super().has_delete_permission(request)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # bulk ORM delete: deletion is job_delete's
        return actions

    # --- list ----------------------------------------------------------------------------

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Job], search_term: str
    ) -> tuple[QuerySet[Job], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            job_id = uuid.UUID(term)
        except ValueError:
            return queryset.filter(idempotency_key=term), False
        return queryset.filter(pk=job_id), False

    @admin.display(description="progress", ordering="progress")
    def progress_percent(self, job: Job) -> str:
        return f"{job.progress:.0f}%"

    @admin.display(description="run time")
    def run_time(self, job: Job) -> str:
        return format_duration(run_time_ms(job))

    @admin.display(description="queue time")
    def queue_time(self, job: Job) -> str:
        return format_duration(job.queue_time_ms)

    # --- actions -------------------------------------------------------------------------

    def _each(
        self,
        request: HttpRequest,
        queryset: QuerySet[Job],
        call: Callable[[Any], str | None],
    ) -> list[str]:
        """Call the service for each selected job; report refusals; return the outcomes."""
        outcomes: list[str] = []
        refusals: list[str] = []
        for job_id in queryset.order_by("created_at").values_list("pk", flat=True):
            try:
                outcome = call(job_id)
            except OmnivaError as exc:
                refusals.append(f"{job_id}: {exc.code}: {exc.message}")
            else:
                if outcome is not None:
                    outcomes.append(outcome)
        for refusal in refusals[:MAX_ERROR_MESSAGES]:
            self.message_user(request, refusal, messages.ERROR)
        if len(refusals) > MAX_ERROR_MESSAGES:
            more = len(refusals) - MAX_ERROR_MESSAGES
            self.message_user(request, f"… and {more} more refused.", messages.ERROR)
        return outcomes

    @admin.action(description="Cancel the selected jobs", permissions=["change"])
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        reason = f"cancelled in the admin by {request.user}"

        def cancel(job_id: Any) -> str:
            _job, finished_now = services.job_cancel(job_id=job_id, reason=reason)
            return "cancelled" if finished_now else "stopping"

        outcomes = self._each(request, queryset, cancel)
        cancelled, stopping = outcomes.count("cancelled"), outcomes.count("stopping")
        if cancelled:
            self.message_user(request, f"Cancelled {_jobs(cancelled)}.", messages.SUCCESS)
        if stopping:
            self.message_user(
                request,
                f"Cancel requested for {_jobs(stopping)} with a running stage; "
                "they stop at their next checkpoint.",
                messages.SUCCESS,
            )

    @admin.action(description="Retry the selected jobs", permissions=["change"])
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        def retry(job_id: Any) -> str:
            services.job_retry(job_id=job_id)
            return "retried"

        retried = len(self._each(request, queryset, retry))
        if retried:
            self.message_user(request, f"Retried {_jobs(retried)}.", messages.SUCCESS)

    @admin.action(
        description="Delete the selected finished jobs (with their stages, logs and files)",
        permissions=["delete"],
    )
    def delete_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        def delete(job_id: Any) -> str:
            services.job_delete(job_id=job_id)
            return "deleted"

        deleted = len(self._each(request, queryset, delete))
        if deleted:
            self.message_user(request, f"Deleted {_jobs(deleted)}.", messages.SUCCESS)


def _jobs(count: int) -> str:
    return f"{count} job" if count == 1 else f"{count} jobs"


@admin.register(QueueTask)
class QueueTaskAdmin(admin.ModelAdmin):
    """Read-only: the broker's queue rows, for seeing what is waiting and what is leased."""

    list_display = ["id", "queue", "priority", "stage_run_id", "deliveries", "visible_at", "state"]
    list_filter = ["queue", "priority"]
    show_full_result_count = False
    ordering = ["queue", "-priority", "id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: QueueTask | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: QueueTask | None = None) -> bool:
        return False

    @admin.display(description="state")
    def state(self, task: QueueTask) -> str:
        if task.visible_at > timezone.now():
            return "leased" if task.deliveries else "delayed"
        return "ready"
