from __future__ import annotations

from django.apps import AppConfig


class OmnivaConfig(AppConfig):
    name = "omniva"
    verbose_name = "Omniva"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from omniva import metrics  # noqa: F401  (registers the Prometheus collectors)
