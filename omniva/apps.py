from __future__ import annotations

from django.apps import AppConfig


class OmnivaConfig(AppConfig):
    name = "omniva"
    verbose_name = "Omniva"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, not at the top: models must not load before the app registry.
        from omniva import metrics

        metrics.register_core_collectors()
