from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from omniva.admin import ServiceBackedAdmin
from omniva.errors import OmnivaError
from omniva.models import Project
from publishing import services
from publishing.models import Destination, Publication, Schedule


class DestinationForm(forms.ModelForm):
    """Secrets are never shown: `new_secrets` sets or replaces some (null removes one)."""

    new_secrets = forms.JSONField(
        required=False,
        help_text='Set secrets as a JSON object, e.g. {"secret": "…"}; null removes one. '
        "Current secrets are never shown.",
        widget=forms.Textarea(attrs={"rows": 3, "autocomplete": "off"}),
    )

    class Meta:
        model = Destination
        fields = ["project", "name", "kind", "config", "active"]

    def clean_new_secrets(self) -> dict[str, Any]:
        value = self.cleaned_data.get("new_secrets") or {}
        if not isinstance(value, dict):
            raise forms.ValidationError("A JSON object of names and values.")
        return value


@admin.register(Destination)
class DestinationAdmin(ServiceBackedAdmin):
    form = DestinationForm
    list_display = ["name", "kind", "project", "active", "masked_secrets", "updated_at"]
    list_filter = ["kind", "active", "project"]
    search_fields = ["name"]
    readonly_fields = ["masked_secrets"]
    fields_of_service = services.DESTINATION_FIELDS

    @admin.display(description="secrets")
    def masked_secrets(self, destination: Destination) -> str:
        return ", ".join(f"{name}: ••••••" for name in sorted(destination.secrets)) or "none"

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        self._new_secrets = form.cleaned_data.get("new_secrets") or {}
        super().save_model(request, obj, form, change)

    def create_item(self, project: Project, fields: dict[str, Any]) -> Destination:
        return services.destination_create(project=project, secrets=self._new_secrets, **fields)

    def update_item(self, item: Destination, fields: dict[str, Any]) -> Destination:
        changes = {**fields, **({"secrets": self._new_secrets} if self._new_secrets else {})}
        return services.destination_update(destination=item, changes=changes)

    def delete_item(self, item: Destination) -> None:
        services.destination_delete(destination=item)


@admin.register(Publication)
class PublicationAdmin(admin.ModelAdmin):
    list_display = ["idempotency_key", "destination", "clip", "status", "attempts", "published_at"]
    list_filter = ["status"]
    search_fields = ["idempotency_key", "external_id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class ScheduleForm(forms.ModelForm):
    class Meta:
        model = Schedule
        fields = ["project", *services.SCHEDULE_FIELDS]

    def clean(self) -> dict[str, Any]:
        super().clean()
        cleaned = self.cleaned_data
        candidate = Schedule(**{k: v for k, v in cleaned.items() if k in self.Meta.fields})
        candidate.cron = candidate.cron or ""
        try:
            services.schedule_check(candidate)
        except OmnivaError as exc:
            for field, messages in (exc.details or {"pipeline": [exc.message]}).items():
                target = field.split(".", 1)[0]
                self.add_error(target if target in self.fields else None, messages)
        return cleaned


SCHEDULE_FORM_FIELDS = ("project", *services.SCHEDULE_FIELDS)
SCHEDULE_READONLY_FIELDS = ("next_run_at", "runs", "last_run_at", "last_job_id")


@admin.register(Schedule)
class ScheduleAdmin(ServiceBackedAdmin):
    """Saved through the services, which keep django-q2's schedule in step."""

    form = ScheduleForm

    list_display = ["__str__", "project", "pipeline", "cron", "interval_s", "active", "runs"]
    list_filter = ["active", "pipeline", "project"]
    search_fields = ["name", "pipeline"]
    fields = SCHEDULE_FORM_FIELDS
    readonly_fields = SCHEDULE_READONLY_FIELDS
    fields_of_service = services.SCHEDULE_FIELDS

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        return SCHEDULE_FORM_FIELDS + (SCHEDULE_READONLY_FIELDS if obj is not None else ())

    def create_item(self, project: Project, fields: dict[str, Any]) -> Schedule:
        return services.schedule_create(project=project, **fields)

    def update_item(self, item: Schedule, fields: dict[str, Any]) -> Schedule:
        return services.schedule_update(schedule=item, changes=fields)

    def delete_item(self, item: Schedule) -> None:
        services.schedule_delete(schedule=item)
