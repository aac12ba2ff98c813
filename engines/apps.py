from __future__ import annotations

from django.apps import AppConfig


class EnginesConfig(AppConfig):
    name = "engines"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, not at the top: models must not load before the app registry.
        from engines import metrics, selectors
        from omniva import selectors as core_selectors
        from omniva.health import register_check

        core_selectors.contribute_metrics(selectors.contribute_metrics)
        register_check("engines", selectors.check_engines)
        metrics.register_collectors()
