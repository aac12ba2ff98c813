"""One stage run, at most one queue row: a row delivered again while its first delivery
waited in a worker's buffer must not start the retry before its backoff (issue 19,
item 7)."""

from __future__ import annotations

import pytest
from django.test import override_settings
from django.utils import timezone

from jobs import services
from jobs.broker import enqueue_payload
from jobs.models import Job, JobStatus, QueueTask, StageRun, StageStatus
from tests.jobs.conftest import claim_one

pytestmark = pytest.mark.django_db

BACKOFF_S = 600


def _a_failing_run_claimed() -> tuple[Job, StageRun, str]:
    job, _ = services.job_submit(pipeline="fail_n_times", params={"n": 5}, max_retries=3)
    run = job.stages.get()
    delivery, _task = claim_one("default")
    return job, run, delivery


def _delivered_again() -> str:
    """The row's lease ran out (a buffer it waited in, a heartbeat that came late): the
    next claim delivers it again."""
    QueueTask.objects.update(visible_at=timezone.now())
    delivery, _task = claim_one("default")
    return delivery


def _fail(run: StageRun, claim: services.StageClaim) -> None:
    services.stage_fail(
        stage_run_id=run.pk,
        token=claim.token,
        code="BOOM",
        message="failed",
        retryable=True,
    )


def _rows_of(run: StageRun) -> list[QueueTask]:
    return list(QueueTask.objects.filter(stage_run_id=run.pk))


@override_settings(OMNIVA_RETRY_BACKOFF_S=[BACKOFF_S])
def test_a_row_delivered_again_does_not_start_the_retry_before_its_backoff() -> None:
    job, run, first = _a_failing_run_claimed()
    claim = services.stage_start(stage_run_id=run.pk, worker="first", ack_id=first)
    assert claim is not None
    second = _delivered_again()
    # The second delivery finds the attempt running: it is put back until the lease ends.
    assert services.stage_start(stage_run_id=run.pk, worker="second", ack_id=second) is None
    _fail(run, claim)

    rows = _rows_of(run)
    assert len(rows) == 1, "the failed attempt's rows go with it; only the retry's is left"
    assert rows[0].visible_at >= timezone.now() + timezone.timedelta(seconds=BACKOFF_S - 60)
    # Whatever the queue hands out now, before the backoff, starts nothing.
    QueueTask.objects.filter(visible_at__lt=timezone.now() + timezone.timedelta(seconds=60)).update(
        visible_at=timezone.now()
    )
    assert claim_one("default") is None
    run.refresh_from_db()
    job.refresh_from_db()
    assert (run.status, run.attempt, job.status) == (StageStatus.QUEUED, 1, JobStatus.RETRYING)


@override_settings(OMNIVA_RETRY_BACKOFF_S=[BACKOFF_S])
def test_a_delivery_of_a_row_that_ended_with_an_earlier_attempt_starts_nothing() -> None:
    job, run, first = _a_failing_run_claimed()
    second = _delivered_again()
    # The second delivery runs first; the first one still waits in another buffer.
    claim = services.stage_start(stage_run_id=run.pk, worker="second", ack_id=second)
    assert claim is not None
    _fail(run, claim)
    # The retry waits for its backoff; the stale delivery in hand must not start it.
    assert services.stage_start(stage_run_id=run.pk, worker="first", ack_id=first) is None
    assert services.stage_start(stage_run_id=run.pk, worker="first", ack_id=second) is None
    run.refresh_from_db()
    job.refresh_from_db()
    assert (run.status, run.attempt, job.status) == (StageStatus.QUEUED, 1, JobStatus.RETRYING)
    assert len(_rows_of(run)) == 1


def test_a_completion_drops_every_row_of_its_run() -> None:
    job, _ = services.job_submit(pipeline="noop")
    run = job.stages.get()
    delivery, _task = claim_one("default")
    # A second row of the same run, as a retry made while a stale one lived on left it.
    enqueue_payload(queue="default", payload="stale", stage_run_id=run.pk)
    claim = services.stage_start(stage_run_id=run.pk, worker="first", ack_id=delivery)
    assert claim is not None
    services.stage_complete(stage_run_id=run.pk, token=claim.token, output={})
    assert _rows_of(run) == []
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
