"""The completer of a worker process (jobs/completer.py): the ends of attempts handed to
it are written many per transaction after its tick, each fenced by its own token, one
failing end never undoing the others; what it holds at the worker's exit is written."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs import completer, services, worker
from jobs.completer import Completer
from jobs.models import Job, JobStatus, QueueTask, StageStatus
from jobs.pipelines.context import StageError
from omniva.errors import FailureCode
from tests.conftest import wait_for
from tests.jobs.conftest import claim_one

pytestmark = pytest.mark.django_db(transaction=True)

TICK_S = 0.3


def started(count: int, pipeline: str = "noop") -> list[services.StageClaim]:
    """`count` jobs submitted and their stages started as a worker starts them."""
    claims = []
    for _ in range(count):
        services.job_submit(pipeline=pipeline, params={})
    while (claimed := claim_one("default")) is not None:
        ack_id, task = claimed
        claim = services.stage_start(stage_run_id=task["args"][0], worker="w:1", ack_id=ack_id)
        assert claim is not None
        claims.append(claim)
    assert len(claims) == count
    return claims


@pytest.fixture
def running() -> Iterator[Completer]:
    thread = Completer(worker._settle, tick_s=TICK_S, max_batch=1000)
    thread.start()
    yield thread
    thread.close()


def statuses(claims: list[services.StageClaim]) -> list[str]:
    return [Job.objects.get(pk=claim.job_id).status for claim in claims]


def test_ends_wait_for_the_tick_then_commit_together(running: Completer) -> None:
    claims = started(5)

    running.submit([(claim, {"n": n}) for n, claim in enumerate(claims)])

    assert statuses(claims) == [JobStatus.RUNNING] * 5, "nothing shows before its batch commits"
    wait_for(lambda: statuses(claims) == [JobStatus.COMPLETED] * 5, timeout=10)
    results = [Job.objects.get(pk=claim.job_id).result for claim in claims]
    assert results == [{"n": n} for n in range(5)]
    assert not QueueTask.objects.exists(), "the deliveries went with their completions"


def test_one_statement_writes_the_completions_of_a_whole_batch() -> None:
    claims = started(20)

    with CaptureQueriesContext(connection) as queries:
        completer.write_ends([(claim, {}) for claim in claims], worker._settle)

    statements = [query["sql"] for query in queries.captured_queries]
    assert statements[0] == "BEGIN", statements
    assert statements[-1] == "COMMIT", statements
    assert len(statements) == 3, "one statement for the whole batch"
    assert statuses(claims) == [JobStatus.COMPLETED] * 20


def test_a_refused_end_in_a_batch_leaves_the_others_written(running: Completer) -> None:
    claims = started(3)
    stale = claims[1]
    services.job_cancel(job_id=stale.job_id, reason="operator")  # its token is revoked

    running.submit([(claim, {"ok": True}) for claim in claims])

    wait_for(
        lambda: statuses(claims) == [JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.COMPLETED],
        timeout=10,
    )
    assert Job.objects.get(pk=stale.job_id).result is None


def test_an_output_the_database_refuses_fails_its_job_alone(running: Completer) -> None:
    claims = started(3)
    outputs: list[Any] = [{"a": 1}, {"text": "nul \u0000 inside"}, {"c": 3}]

    running.submit(list(zip(claims, outputs, strict=True)))

    wait_for(lambda: JobStatus.RUNNING not in statuses(claims), timeout=10)
    assert statuses(claims) == [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.COMPLETED]
    assert Job.objects.get(pk=claims[1].job_id).error["code"] == FailureCode.BAD_OUTPUT


def test_failures_and_their_retries_go_through_the_completer(running: Completer) -> None:
    [claim] = started(1)

    running.submit([(claim, StageError(FailureCode.STAGE_FAILED, "boom", retryable=True))])

    wait_for(lambda: statuses([claim]) == [JobStatus.RETRYING], timeout=10)
    run = Job.objects.get(pk=claim.job_id).stages.get()
    assert run.status == StageStatus.QUEUED
    assert QueueTask.objects.filter(stage_run_id=run.pk).count() == 1, "one retry row"


def test_closing_writes_what_waits_without_waiting_for_the_tick() -> None:
    thread = Completer(worker._settle, tick_s=60.0, max_batch=1000)
    thread.start()
    claims = started(4)
    thread.submit([(claim, {}) for claim in claims])

    thread.close(timeout_s=10)

    assert not thread.is_alive()
    assert statuses(claims) == [JobStatus.COMPLETED] * 4


def test_a_full_batch_is_written_before_its_tick(running: Completer) -> None:
    full = Completer(worker._settle, tick_s=60.0, max_batch=3)
    full.start()
    try:
        claims = started(3)
        full.submit([(claim, {}) for claim in claims])
        wait_for(lambda: statuses(claims) == [JobStatus.COMPLETED] * 3, timeout=10)
    finally:
        full.close()


def test_a_fault_of_ours_while_writing_does_not_end_the_completer() -> None:
    def broken(claim: services.StageClaim, outcome: Any) -> None:
        raise RuntimeError("a bug in settling")

    thread = Completer(broken, tick_s=0.01, max_batch=1000)
    thread.start()
    try:
        first, second = started(2)
        # Not a one-stage completion: it goes through `broken`.
        thread.submit([(first, StageError(FailureCode.STAGE_FAILED, "boom"))])
        wait_for(lambda: not thread.waiting and not thread.writing, timeout=10)
        assert thread.is_alive()
        thread.submit([(second, {"ok": True})])
        wait_for(lambda: statuses([second]) == [JobStatus.COMPLETED], timeout=10)
    finally:
        thread.close()
