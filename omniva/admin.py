from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from omniva import services
from omniva.models import ApiKey, AuditRecord, Clip, Creator, Project

admin.site.site_header = "Omniva"
admin.site.site_title = "Omniva admin"


@admin.register(Project)
class ProjectAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created with `manage.py apikey create`, which shows the secret once."""

    list_display = [
        "name",
        "prefix",
        "scopes",
        "project",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    list_filter = ["revoked_at"]
    search_fields = ["name", "prefix"]
    readonly_fields = [
        "name",
        "prefix",
        "key_hash",
        "scopes",
        "project",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            services.api_key_revoke(name=key.name)
        self.message_user(request, f"Revoked {queryset.count()} key(s).", messages.SUCCESS)


@admin.register(AuditRecord)
class AuditRecordAdmin(admin.ModelAdmin):
    """Read-only: the audit trail is written by the API, never edited."""

    list_display = [
        "at",
        "request_id",
        "method",
        "path",
        "status",
        "duration_ms",
        "key_name",
        "user",
    ]
    list_filter = ["status", "method"]
    search_fields = ["request_id", "path", "key_name"]
    date_hierarchy = "at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditRecord | None = None) -> bool:
        return False


class ServiceBackedAdmin(admin.ModelAdmin):
    """Saves and deletes through the services, as the API does (a clip's changed text
    queues its embedding either way)."""

    fields_of_service: tuple[str, ...] = ()

    def create_item(self, project: Project, fields: dict[str, Any]) -> Any:
        raise NotImplementedError

    def update_item(self, item: Any, fields: dict[str, Any]) -> Any:
        raise NotImplementedError

    def delete_item(self, item: Any) -> None:
        raise NotImplementedError

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        fields = {
            name: form.cleaned_data[name]
            for name in self.fields_of_service
            if name in form.cleaned_data
        }
        if change:
            self.update_item(obj, fields)
        else:
            obj.pk = self.create_item(form.cleaned_data["project"], fields).pk

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        self.delete_item(obj)


@admin.register(Creator)
class CreatorAdmin(ServiceBackedAdmin):
    list_display = ["name", "project", "platform", "handle", "active", "updated_at"]
    list_filter = ["active", "platform", "project"]
    search_fields = ["name", "handle", "source_url"]
    fields_of_service = services.CREATOR_FIELDS

    def create_item(self, project: Project, fields: dict[str, Any]) -> Creator:
        return services.creator_create(project=project, **fields)

    def update_item(self, item: Creator, fields: dict[str, Any]) -> Creator:
        return services.creator_update(creator=item, changes=fields)

    def delete_item(self, item: Creator) -> None:
        services.creator_delete(creator=item)


@admin.register(Clip)
class ClipAdmin(ServiceBackedAdmin):
    list_display = ["__str__", "project", "creator", "status", "embedded_at", "created_at"]
    list_filter = ["status", "project"]
    search_fields = ["title", "transcript", "source_url"]
    exclude = ["embedding", "embedded_text"]
    readonly_fields = ["embedded_at"]
    fields_of_service = services.CLIP_FIELDS

    def create_item(self, project: Project, fields: dict[str, Any]) -> Clip:
        return services.clip_create(project=project, **fields)

    def update_item(self, item: Clip, fields: dict[str, Any]) -> Clip:
        return services.clip_update(clip=item, changes=fields)

    def delete_item(self, item: Clip) -> None:
        services.clip_delete(clip=item)
