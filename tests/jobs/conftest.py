"""Job-engine fixtures: an in-process worker that claims through the broker's own SQL.

`drain` is a real worker minus the process: it claims rows with the broker's claim
statement (priority, leases, SKIP LOCKED), unpacks the signed django-q2 task, runs
`jobs.tasks.run_stage` and acknowledges the delivery. It uses Django's connection, so
it sees what a test wrote inside its transaction; tests about processes start
`qcluster` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from django_q.signing import SignedPackage

from jobs import broker, tasks
from jobs.models import Job, QueueTask


@dataclass
class Drained:
    ran: list[str] = field(default_factory=list)  # task names in the order they started

    def __len__(self) -> int:
        return len(self.ran)


def claim_one(queue: str) -> tuple[str, dict[str, Any]] | None:
    with connection.cursor() as cursor:
        cursor.execute(
            broker.CLAIM_SQL, {"lease": broker.task_lease_s(), "queue": queue, "limit": 1}
        )
        row = cursor.fetchone()
    if row is None:
        return None
    row_id, deliveries, _priority, payload = row
    return f"{row_id}:{deliveries}", SignedPackage.loads(payload)


def run_delivery(ack_id: str, task: dict[str, Any]) -> None:
    tasks.remember_delivery(sender=None, func=None, task={**task, "ack_id": ack_id})
    tasks.run_stage(*task["args"], **task["kwargs"])
    broker.acknowledge_delivery(ack_id=ack_id)


@pytest.fixture
def drain(db: None) -> Callable[..., Drained]:
    def drain(queue: str = "default", *, limit: int = 10_000) -> Drained:
        drained = Drained()
        while len(drained) < limit:
            claimed = claim_one(queue)
            if claimed is None:
                return drained
            ack_id, task = claimed
            drained.ran.append(task["name"])
            run_delivery(ack_id, task)
        return drained

    return drain


def make_due(job: Job) -> None:
    """Bring every delayed queue row of `job` due now (instead of waiting out a backoff)."""
    QueueTask.objects.filter(stage_run_id__in=job.stages.values("pk")).update(
        visible_at=timezone.now()
    )


@pytest.fixture
def due() -> Callable[[Job], None]:
    return make_due
