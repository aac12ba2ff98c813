"""The PostgreSQL queue under django-q2 (jobs/broker.py), one statement at a time: the
claim's order, the fence of a delivery (row id + deliveries), deferral and redelivery
after a lease runs out. Rows are claimed with the broker's own CLAIM_SQL on Django's
connection, so they live in the test's transaction."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from jobs.broker import (
    CLAIM_SQL,
    ack_id_for,
    acknowledge_delivery,
    claim_stage_tasks,
    defer_delivery,
    delivery_is_current,
    enqueue_payload,
    extend_lease,
    parse_ack_id,
)
from jobs.models import Job, QueueTask, StageRun
from tests.conftest import wait_for

QUEUE = "broker-test"


def enqueue(payload: str, *, priority: int = 5, delay_s: float = 0.0, **kwargs: Any) -> int:
    return enqueue_payload(
        queue=QUEUE, payload=payload, priority=priority, delay_s=delay_s, **kwargs
    )


def claim(*, lease_s: float = 300.0) -> tuple[str, str] | None:
    """One ready row of QUEUE, claimed with the broker's statement: (ack id, payload)."""
    with connection.cursor() as cursor:
        cursor.execute(CLAIM_SQL, {"lease": lease_s, "queue": QUEUE, "limit": 1})
        row = cursor.fetchone()
    if row is None:
        return None
    row_id, deliveries, _priority, payload = row
    return ack_id_for(row_id, deliveries), payload


def claimed_payloads(most: int = 100) -> list[str]:
    """Claim until nothing is ready (a row claimed twice here means the lease did not hold)."""
    payloads = []
    while (claimed := claim()) is not None:
        payloads.append(claimed[1])
        assert len(payloads) <= most, payloads[:10]
    return payloads


def lease_runs_out(row_id: int) -> None:
    """What time does to a claimed row whose worker stopped renewing its lease."""
    QueueTask.objects.filter(pk=row_id).update(visible_at=timezone.now() - timedelta(seconds=1))


# --- Claim order ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_claim_takes_the_highest_priority_first_and_the_oldest_among_equals() -> None:
    enqueue("low", priority=1)
    enqueue("high-old", priority=9)
    enqueue("normal", priority=5)
    enqueue("high-new", priority=9)

    assert claimed_payloads() == ["high-old", "high-new", "normal", "low"]


@pytest.mark.django_db
def test_a_row_enqueued_with_a_delay_is_not_claimable_before_its_time() -> None:
    enqueue("later", priority=9, delay_s=3600)
    enqueue("now", priority=1)

    assert claimed_payloads() == ["now"]
    assert QueueTask.objects.get(payload="later").deliveries == 0


@pytest.mark.django_db
def test_claim_stage_tasks_claims_only_rows_of_the_named_stages_in_priority_then_age_order() -> (
    None
):
    def stage_row(pipeline: str, stage: str, priority: int) -> int:
        job = Job.objects.create(pipeline=pipeline, priority=priority)
        run = StageRun.objects.create(job=job, name=stage)
        enqueue(f"{pipeline}.{stage}", priority=priority, stage_run_id=run.pk)
        return run.pk

    embed_low = stage_row("embed", "vectors", 2)
    stage_row("caption", "describe", 9)
    embed_high = stage_row("embed", "vectors", 8)

    claimed = claim_stage_tasks(queue=QUEUE, stages=["embed.vectors"], limit=10)

    assert [run_id for _, run_id in claimed] == [embed_high, embed_low]
    assert all(delivery_is_current(ack_id=ack_id) for ack_id, _ in claimed)
    assert claimed_payloads() == ["caption.describe"]  # the other stage's row is still ready


# --- Fencing -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_ack_id_of_an_earlier_delivery_acknowledges_nothing_once_the_row_was_redelivered() -> (
    None
):
    row_id = enqueue("task")
    first = claim()
    assert first is not None
    lease_runs_out(row_id)
    second = claim()
    assert second is not None

    acknowledge_delivery(ack_id=first[0])

    assert QueueTask.objects.filter(pk=row_id).exists()
    assert not delivery_is_current(ack_id=first[0])
    assert delivery_is_current(ack_id=second[0])
    assert not extend_lease(ack_id=first[0], lease_s=300)

    acknowledge_delivery(ack_id=second[0])

    assert not QueueTask.objects.filter(pk=row_id).exists()
    assert not delivery_is_current(ack_id=second[0])


# --- Deferral ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_deferred_row_comes_back_at_its_time_as_a_new_delivery() -> None:
    row_id = enqueue("task")
    claimed = claim()
    assert claimed is not None
    ack_id = claimed[0]
    until = timezone.now() + timedelta(seconds=2)

    defer_delivery(ack_id=ack_id, until=until)

    row = QueueTask.objects.get(pk=row_id)
    assert row.visible_at == until
    assert row.deliveries == 2  # the deferral counts as a delivery
    assert not delivery_is_current(ack_id=ack_id)
    acknowledge_delivery(ack_id=ack_id)  # what follows the deferring task's return
    assert QueueTask.objects.filter(pk=row_id).exists()
    assert claim() is None

    again = wait_for(claim, timeout=30, what="the deferred row to come due")

    assert timezone.now() >= until
    assert again == (ack_id_for(row_id, 3), "task")


# --- Redelivery ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_claimed_row_is_claimed_again_with_one_more_delivery_once_its_lease_has_passed() -> None:
    row_id = enqueue("task")
    lease_s = 2.0
    claimed_at = timezone.now()
    first = claim(lease_s=lease_s)
    assert first is not None
    assert claim(lease_s=lease_s) is None  # the lease holds it

    second = wait_for(lambda: claim(lease_s=lease_s), timeout=30, what="the lease to pass")

    assert timezone.now() >= claimed_at + timedelta(seconds=lease_s)
    assert parse_ack_id(first[0]) == (row_id, 1)
    assert parse_ack_id(second[0]) == (row_id, 2)
    assert second[1] == "task"
