from __future__ import annotations

from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, not at the top: models must not load before the app registry.
        from django_q.signals import post_execute_in_worker, post_spawn, pre_execute

        from engines import services as engine_services
        from jobs import broker, fetching, metrics, selectors, services, worker

        # The declarations register their pipelines when imported.
        from jobs.pipelines import api_call, builtin, data_analysis, gpu, reports  # noqa: F401
        from omniva import connection_health
        from omniva import selectors as core_selectors
        from omniva import services as core_services
        from omniva.health import register_check

        core_selectors.contribute_info(selectors.contribute_info)
        core_selectors.contribute_metrics(selectors.contribute_metrics)
        register_check("queues", selectors.check_queues)
        register_check("gpu", selectors.check_gpu)
        metrics.register_collectors()
        # An engine stage's event reaches the orchestrator through these (engines/).
        engine_services.register_stage_callbacks(services.engine_stage_callbacks())
        # A clip whose title or transcript changed is embedded by a job (pipelines/gpu.py).
        core_services.register_clip_embedding_hook(
            lambda clip: services.job_submit(
                pipeline="clip_embed", params={"clip_id": str(clip.pk)}, project=clip.project
            )
        )

        # The broker's claim starts the stages it claims (services/fastpath.py).
        broker.claim_with_starts(services.tasks_claim_starting, give_back=services.tasks_give_back)
        # The worker needs its task's delivery id to heartbeat and acknowledge it.
        pre_execute.connect(worker.remember_delivery, dispatch_uid="omniva.remember_delivery")
        # A worker of the gpu cluster warms its models up and reports its device.
        post_spawn.connect(worker.on_worker_spawned, dispatch_uid="omniva.gpu_reporter")
        # Then it waits for a task: the pusher claims by demand (jobs/fetching.py).
        post_spawn.connect(fetching.worker_spawned, dispatch_uid="omniva.worker_ready")
        pre_execute.connect(fetching.worker_task_started, dispatch_uid="omniva.task_started")
        post_execute_in_worker.connect(fetching.worker_task_done, dispatch_uid="omniva.task_done")
        # django-q2 makes each task a request of the database's (close_old_connections):
        # a worker's connection busy a moment ago is not pinged (omniva/connection_health.py).
        pre_execute.connect(
            lambda **_: connection_health.health_checks_skip_for_busy_connections(),
            dispatch_uid="omniva.skip_health_check",
            weak=False,
        )
        post_execute_in_worker.connect(
            lambda **_: connection_health.connections_work_finished(),
            dispatch_uid="omniva.work_finished",
            weak=False,
        )
