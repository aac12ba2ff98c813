"""Driving deliveries in tests and benchmarks, as a worker process would (like River's
rivertest): claim one ready task of a queue with the broker's claim, and run it here."""

from __future__ import annotations

import pydoc
from typing import Any

from django.db import connection
from django_q.signing import SignedPackage

from jobs.broker import CLAIM_SQL, ack_id_for, acknowledge_delivery, task_lease_s
from jobs.worker import remember_delivery


def claim_delivery(queue: str) -> tuple[str, dict[str, Any]] | None:
    """One ready task of `queue`, claimed with the broker's CLAIM_SQL: its ack id and the
    unpacked django-q2 task (for running it in this process: benchmarks and tests). It
    claims without starting, so that a test can act between the claim and the start; a
    cluster's claim also starts the stage (services.tasks_claim_starting), and the
    worker then runs it from its grant."""
    with connection.cursor() as cursor:
        cursor.execute(CLAIM_SQL, {"lease": task_lease_s(), "queue": queue, "limit": 1})
        row = cursor.fetchone()
    if row is None:
        return None
    row_id, deliveries, _priority, payload = row
    return ack_id_for(row_id, deliveries), SignedPackage.loads(payload)


def run_delivery(ack_id: str, task: dict[str, Any]) -> None:
    """Run a claimed task here as a worker process does, and acknowledge it."""
    remember_delivery(sender=None, func=None, task={**task, "ack_id": ack_id})
    func = task["func"]
    if isinstance(func, str):  # as django-q2's worker resolves it
        func = pydoc.locate(func)
    func(*task["args"], **task["kwargs"])
    acknowledge_delivery(ack_id=ack_id)
