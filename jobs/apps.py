from __future__ import annotations

from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_q.signals import pre_execute

        from jobs import builtin, tasks  # noqa: F401  (builtin registers its pipelines)

        # The worker needs its task's delivery id to heartbeat and acknowledge it.
        pre_execute.connect(tasks.remember_delivery, dispatch_uid="omniva.remember_delivery")
