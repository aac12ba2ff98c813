from __future__ import annotations

from django.apps import AppConfig


class PublishingConfig(AppConfig):
    name = "publishing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The declarations register their pipelines (jobs.pipelines.registry) when imported.
        from publishing.pipelines import clipfarm, pod, publish  # noqa: F401
