"""The queue core's prepared statements touch rows in proportion to their batch, never to
a table, whatever the statistics say (jobs/services/fastpath.py, "Plans that do not
depend on statistics").

The statistics are made as they come in production: a table held only dead rows when
it was analyzed (a purge, a drained queue), so PostgreSQL takes it for empty, and then
JOBS rows arrived. Every statement runs prepared with a generic plan planned now, with
auto_explain reporting each plan with its actual row counts, and no plan node may touch
more rows than a small multiple of the batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connection, transaction
from django_q.signing import SignedPackage

from jobs import broker, services
from jobs.models import Job, QueueTask, StageRun, StageStatus
from jobs.services import fastpath

pytestmark = pytest.mark.django_db

# Jobs before the purge and after it (the rows a plan may touch), and the versions of
# each row before it (the tables' pages).
JOBS = 300
VERSIONS = 8
BATCH = 4
# Rows a node may touch: a CTE joined to another of the batch is BATCH * BATCH.
MOST_ROWS = BATCH * BATCH * 2


@pytest.fixture
def statistics_say_empty() -> None:
    for _ in range(JOBS):
        services.job_submit(pipeline="noop", params={})
    with connection.cursor() as cursor:
        # Row versions that are dead by the ANALYZE: the tables' pages, as a busy
        # deployment's are.
        for _ in range(VERSIONS):
            cursor.execute("UPDATE jobs_job SET updated_at = updated_at")
            cursor.execute("UPDATE jobs_stagerun SET progress = progress")
            cursor.execute("UPDATE jobs_queuetask SET deliveries = deliveries")
        cursor.execute("DELETE FROM jobs_queuetask")
        Job.objects.all().delete()
        cursor.execute("ANALYZE jobs_job, jobs_stagerun, jobs_queuetask")
        cursor.execute("SELECT reltuples FROM pg_class WHERE relname = 'jobs_job'")
        assert cursor.fetchone()[0] == 0, "the statistics say the jobs table is empty"
    for _ in range(JOBS):
        services.job_submit(pipeline="noop", params={})


class Plans:
    """The plans auto_explain reports on Django's connection, with actual row counts."""

    def __init__(self) -> None:
        self.plans: list[dict[str, Any]] = []

    def notice(self, diagnostic: Any) -> None:
        message = diagnostic.message_primary or ""
        if message.startswith("duration:") and "{" in message:
            self.plans.append(json.loads(message[message.index("{") :]))

    def take(self) -> list[dict[str, Any]]:
        taken, self.plans = self.plans, []
        assert taken, "auto_explain reported no plan"
        return taken


@pytest.fixture
def plans(statistics_say_empty: None) -> Iterator[Plans]:
    plans = Plans()
    connection.ensure_connection()
    connection.connection.add_notice_handler(plans.notice)
    with connection.cursor() as cursor:
        cursor.execute("LOAD 'auto_explain'")
        for setting, value in (
            ("log_min_duration", "0"),
            ("log_analyze", "on"),
            ("log_format", "json"),
            ("log_level", "notice"),
        ):
            cursor.execute(f"SET auto_explain.{setting} = '{value}'")
    yield plans
    with connection.cursor() as cursor:
        cursor.execute("SET auto_explain.log_min_duration = -1")
    connection.connection.remove_notice_handler(plans.notice)


def rows_touched(node: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """(node, rows it returned or filtered out over all its loops) for a plan's nodes."""
    loops = node.get("Actual Loops", 1)
    kept = node.get("Actual Rows", 0)
    removed = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Join Filter", 0)
    name = f"{node['Node Type']} {node.get('Relation Name', node.get('CTE Name', ''))}"
    yield name, round((kept + removed) * loops)
    for child in node.get("Plans", []):
        yield from rows_touched(child)


def assert_bounded(plans: list[dict[str, Any]]) -> None:
    for plan in plans:
        name, rows = max(rows_touched(plan["Plan"]), key=lambda touched: touched[1])
        assert rows <= MOST_ROWS, (
            f"{name} touched {rows} rows of a batch of {BATCH}:\n{json.dumps(plan, indent=1)}"
        )


def claim(limit: int = BATCH) -> list[services.StageClaim]:
    """The broker's claim that starts (on Django's connection, prepared like the
    broker's), and the claims of what it started."""
    raw = connection.connection
    # The broker's connection binds on the server (Django's binds on the client, and a
    # client-bound statement is never prepared).
    factory, raw.cursor_factory = raw.cursor_factory, psycopg.Cursor
    try:
        tasks = fastpath.tasks_claim_starting(
            raw, queue="default", limit=limit, lease_s=60.0, worker="host:1"
        )
    finally:
        raw.cursor_factory = factory
    grants = [(ack, SignedPackage.loads(payload)["kwargs"]["grant"]) for ack, payload, _ in tasks]
    return [fastpath.stage_granted(grant=grant, ack_id=ack) for ack, grant in grants]


def test_the_claim_that_starts_touches_only_its_batch(plans: Plans) -> None:
    claimed = claim()

    assert len(claimed) == BATCH
    assert_bounded(plans.take())


def test_the_heartbeat_touches_only_its_batch(plans: Plans) -> None:
    claimed = claim()
    plans.take()

    held = services.stages_heartbeat(claims=claimed, worker="host:1:7")

    assert len(held) == BATCH
    assert_bounded(plans.take())


def test_the_batched_completion_touches_only_its_batch(plans: Plans) -> None:
    claimed = claim()
    plans.take()

    with transaction.atomic():
        done = fastpath.stages_complete_sole(
            [fastpath.Completion(c.stage_run_id, c.token, {"ok": True}) for c in claimed]
        )

    assert done == {c.stage_run_id for c in claimed}
    assert_bounded(plans.take())


def test_the_start_of_granted_runs_touches_only_its_batch(plans: Plans) -> None:
    with connection.cursor() as cursor:
        cursor.execute(broker.CLAIM_SQL, {"lease": 60.0, "queue": "default", "limit": BATCH})
        claimed = {row[0]: broker.ack_id_for(row[0], row[1]) for row in cursor.fetchall()}
    runs = dict(QueueTask.objects.filter(pk__in=claimed).values_list("stage_run_id", "pk"))
    plans.take()

    started = fastpath.stages_start_granted(
        ack_ids={run_id: claimed[row_id] for run_id, row_id in runs.items()}, worker="host:1:7"
    )

    assert len(started) == BATCH
    assert_bounded(plans.take())


def test_the_batched_dag_completion_touches_only_its_batch(plans: Plans) -> None:
    for _ in range(BATCH):
        services.job_submit(pipeline="fan_out_fan_in", params={"width": 2}, priority=9)
    claimed = claim()
    assert {c.pipeline for c in claimed} == {"fan_out_fan_in"}
    plans.take()

    with transaction.atomic():
        done = services.stages_complete_dag(
            [fastpath.Completion(c.stage_run_id, c.token, {"ok": True}) for c in claimed]
        )

    assert done == {c.stage_run_id for c in claimed}
    parts = StageRun.objects.filter(name__startswith="part_", status=StageStatus.QUEUED)
    assert parts.count() == BATCH * 2
    assert_bounded(plans.take())
