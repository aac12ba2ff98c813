"""django-q2 entry points only: each loads what its task names and calls the worker
runtime (jobs/worker.py) or a service. Queued rows name these functions by their dotted
path (`jobs.tasks.run_stage`), so they keep their names and places."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings

from jobs import services, worker

logger = logging.getLogger("omniva.jobs.worker")


def run_stage(stage_run_id: int, grant: dict[str, Any] | None = None) -> None:
    """Run one attempt of a stage (jobs/worker.py); `grant`: the attempt the broker's
    claim started (services.tasks_claim_starting)."""
    worker.run_attempt(stage_run_id, grant)


def retention_run(**_: Any) -> dict[str, int]:
    """The retention schedule came due (services.RETENTION_SCHEDULE): one pass, cut short
    at half a task lease. Nothing renews the lease of a task that runs no stage, so a
    longer pass would be delivered to a second worker meanwhile; the next pass goes on
    where this one stopped."""
    pruned = services.retention_run(budget_s=settings.OMNIVA_TASK_LEASE_S / 2)
    logger.info("retention pass: %s", pruned)
    return pruned
