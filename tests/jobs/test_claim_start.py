"""The broker's claim that starts what it claims (services.tasks_claim_starting): one
statement claims a queue's ready tasks and starts their stages, and the worker runs a
started task from its grant without a start of its own. The claim runs here on Django's
connection, so its rows live in the test's transaction."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.signing import SignedPackage

from jobs import services
from jobs.models import Job, JobStatus, QueueTask, StageStatus
from jobs.testing import run_delivery
from omniva.models import Activity
from omniva.notifications import own_connection_params

pytestmark = pytest.mark.django_db


def claim_starting(limit: int = 10, *, worker: str = "host:1") -> list[tuple[str, dict[str, Any]]]:
    """The broker's claim of `default` (ack id, unpacked task of each)."""
    connection.ensure_connection()
    tasks = services.tasks_claim_starting(
        connection.connection, queue="default", limit=limit, lease_s=60.0, worker=worker
    )
    return [(ack_id, SignedPackage.loads(payload)) for ack_id, payload, _ in tasks]


def test_the_claim_starts_the_stage_of_every_task_it_claims_and_hands_over_its_grant() -> None:
    jobs = [services.job_submit(pipeline="noop", params={}, priority=n)[0] for n in range(1, 4)]

    claimed = claim_starting(worker="box:42")

    assert len(claimed) == 3
    for job in jobs:
        job.refresh_from_db()
        run = job.stages.get()
        assert (job.status, run.status, run.attempt, run.worker) == (
            JobStatus.RUNNING,
            StageStatus.RUNNING,
            1,
            "box:42",
        )
        assert job.started_at is not None
        assert run.lease_expires_at > timezone.now()
    grants = {task["kwargs"]["grant"]["job_id"]: task["kwargs"]["grant"] for _, task in claimed}
    assert set(grants) == {str(job.pk) for job in jobs}
    for job in jobs:
        run = job.stages.get()
        grant = grants[str(job.pk)]
        assert (grant["stage_run_id"], grant["token"], grant["params"], grant["attempt"]) == (
            run.pk,
            str(run.lease_token),
            job.params,
            1,
        )
    # Each start is on the live stream, as a start by the worker is.
    running = Activity.objects.filter(kind="stage:update", data__status=StageStatus.RUNNING)
    assert running.count() == 3


def test_a_granted_task_runs_in_its_worker_without_a_start_of_its_own() -> None:
    job, _ = services.job_submit(pipeline="noop", params={})
    [(ack_id, task)] = claim_starting()
    started = Activity.objects.filter(job_id=job.pk, data__status=StageStatus.RUNNING).count()

    run_delivery(ack_id, task)

    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.stages.get().attempt == 1
    again = Activity.objects.filter(job_id=job.pk, data__status=StageStatus.RUNNING).count()
    assert again == started, "the worker did not start the stage a second time"
    assert not QueueTask.objects.exists()


def test_claimed_tasks_come_in_priority_then_age_order() -> None:
    low, _ = services.job_submit(pipeline="noop", params={}, priority=2)
    urgent, _ = services.job_submit(pipeline="noop", params={}, priority=9)
    normal, _ = services.job_submit(pipeline="noop", params={})

    order = [task["kwargs"]["grant"]["job_id"] for _, task in claim_starting()]

    assert order == [str(urgent.pk), str(normal.pk), str(low.pk)]


def test_a_task_whose_job_asks_to_be_cancelled_is_claimed_but_not_started() -> None:
    job, _ = services.job_submit(pipeline="noop", params={})
    Job.objects.filter(pk=job.pk).update(cancel_requested_at=timezone.now())

    [(ack_id, task)] = claim_starting()

    assert "grant" not in task["kwargs"]
    assert job.stages.get().status == StageStatus.QUEUED
    run_delivery(ack_id, task)  # the worker's stage_start decides under the full rules
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED


@pytest.mark.django_db(transaction=True)
def test_a_task_whose_job_row_is_locked_is_delivered_without_a_start_instead_of_waiting() -> None:
    job, _ = services.job_submit(pipeline="noop", params={})
    # A transition holding the job (its transaction not yet committed) on another session.
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with psycopg.connect(**own_connection_params()) as other:
            other.execute("SELECT 1 FROM jobs_job WHERE id = %s FOR UPDATE", [job.pk])
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        [(_ack_id, task)] = claim_starting()
    finally:
        release.set()
        holder.join()

    assert "grant" not in task["kwargs"]
    assert job.stages.get().status == StageStatus.QUEUED


@pytest.mark.django_db(transaction=True)
def test_the_claim_runs_prepared_with_a_generic_plan_on_the_brokers_session() -> None:
    from jobs.broker import PostgresBroker

    for _ in range(6):
        services.job_submit(pipeline="noop", params={})
    broker = PostgresBroker(list_key="default")
    for _ in range(6):
        assert len(broker.claim(1)) == 1
    plans = broker._db().execute(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
        "WHERE statement LIKE '%%WITH picked AS MATERIALIZED%%'"
    )
    [(generic, custom)] = plans.fetchall()
    broker._db().close()
    assert (generic, custom) == (6, 0)
    assert Job.objects.filter(status=JobStatus.RUNNING).count() == 6


def test_a_started_dag_stage_carries_its_parents_outputs_and_its_worker_reads_none() -> None:
    job, _ = services.job_submit(pipeline="fan_out_fan_in", params={"width": 2})
    [(ack_id, split)] = claim_starting()
    run_delivery(ack_id, split)  # the split completes and queues the parts

    parts = claim_starting()

    assert len(parts) == 2
    split_output = job.stages.get(name="split").output
    for ack_id, task in parts:
        grant = task["kwargs"]["grant"]
        assert grant["outputs"] == {"split": split_output}
        with CaptureQueriesContext(connection) as queries:
            claim = services.stage_granted(grant=grant, ack_id=ack_id)
        assert queries.captured_queries == [], "read again by the worker"
        assert claim.inputs == {"split": split_output}
