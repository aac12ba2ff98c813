from __future__ import annotations

from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_q.signals import pre_execute

        from jobs import builtin, selectors, tasks  # noqa: F401  (builtin registers pipelines)
        from omniva import selectors as core_selectors
        from omniva.health import register_check

        core_selectors.contribute_info(selectors.contribute_info)
        core_selectors.contribute_metrics(selectors.contribute_metrics)
        register_check("queues", selectors.check_queues)

        # The worker needs its task's delivery id to heartbeat and acknowledge it.
        pre_execute.connect(tasks.remember_delivery, dispatch_uid="omniva.remember_delivery")
