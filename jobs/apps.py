from __future__ import annotations

from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_q.signals import post_execute_in_worker, post_spawn, pre_execute

        from jobs import builtin, gpu, reports, selectors, tasks  # noqa: F401  (they register)
        from omniva import selectors as core_selectors
        from omniva.health import register_check

        core_selectors.contribute_info(selectors.contribute_info)
        core_selectors.contribute_metrics(selectors.contribute_metrics)
        register_check("queues", selectors.check_queues)
        register_check("gpu", selectors.check_gpu)

        # An engine stage's event reaches the orchestrator through these (engines/).
        from engines import services as engines
        from jobs import services

        engines.stage_callbacks = engines.StageCallbacks(
            lock=lambda stage_run_id: services.core._lock_job_of_stage(stage_run_id),
            claimed=lambda stage_run_id, engine: services.stage_engine_claimed(
                stage_run_id=stage_run_id, engine=engine
            ),
            progress=lambda stage_run_id, progress: services.stage_engine_progress(
                stage_run_id=stage_run_id, progress=progress
            ),
            finished=lambda stage_run_id, output, error, engine: services.stage_engine_finished(
                stage_run_id=stage_run_id, output=output, error=error, engine=engine
            ),
            expire=lambda stage_run_id: services.stage_engine_expire(stage_run_id=stage_run_id),
        )

        # The worker needs its task's delivery id to heartbeat and acknowledge it.
        pre_execute.connect(tasks.remember_delivery, dispatch_uid="omniva.remember_delivery")
        # A clip whose title or transcript changed is embedded by a job (jobs/gpu.py).
        from omniva import services as core_services

        core_services.clip_embedding_requested = lambda clip: services.job_submit(
            pipeline="clip_embed", params={"clip_id": str(clip.pk)}, project=clip.project
        )
        # A worker of the gpu cluster warms its models up and reports its device.
        post_spawn.connect(tasks.on_worker_spawned, dispatch_uid="omniva.gpu_reporter")
        # Then it waits for a task: the pusher claims by demand (jobs/broker.py).
        from jobs import broker

        post_spawn.connect(broker.worker_spawned, dispatch_uid="omniva.worker_ready")
        pre_execute.connect(broker.worker_task_started, dispatch_uid="omniva.task_started")
        post_execute_in_worker.connect(broker.worker_task_done, dispatch_uid="omniva.task_done")
