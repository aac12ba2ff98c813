"""The orchestrator's transitions, run by the in-process worker (`drain`) on the real broker."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import services
from jobs.models import Job, JobLog, JobStatus, QueueTask, StageRun, StageStatus
from jobs.pipelines.context import StageCancelled, StageLeaseLost
from omniva.errors import ErrorCode, OmnivaError
from tests.conftest import wait_for
from tests.jobs.conftest import RUNS, claim_one

pytestmark = pytest.mark.django_db


def submit(pipeline: str, **kwargs: Any) -> Job:
    job, created = services.job_submit(pipeline=pipeline, **kwargs)
    assert created
    return job


def test_urgent_job_behind_500_low_ones_starts_first(drain: Any) -> None:
    low = [submit("noop", priority="low") for _ in range(500)]
    urgent = submit("noop", priority="urgent")
    drained = drain()
    assert len(drained) == 501
    assert drained.ran[0].endswith(f":{urgent.stages.get().pk}")
    urgent.refresh_from_db()
    first_low = Job.objects.filter(pk__in=[j.pk for j in low]).order_by("started_at").first()
    assert urgent.started_at < first_low.started_at


def test_equal_priorities_start_oldest_first(drain: Any) -> None:
    jobs = [submit("noop", priority=5) for _ in range(5)]
    drained = drain()
    assert drained.ran == [f"noop.noop:{job.stages.get().pk}" for job in jobs]


def test_fan_out_runs_every_part_after_split_and_join_after_all_parts(drain: Any) -> None:
    job = submit("fan_out_fan_in", params={"width": 4})
    drained = drain()
    names = [name.split(".", 1)[1].split(":")[0] for name in drained.ran]
    assert names[0] == "split"
    assert sorted(names[1:5]) == ["part_0", "part_1", "part_2", "part_3"]
    assert names[5] == "join"
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.result == {"parts": [0, 1, 2, 3], "sum_of_squares": 14}
    join = job.stages.get(name="join")
    parts = job.stages.exclude(name__in=["split", "join"])
    assert all(join.started_at >= part.finished_at for part in parts)


def test_a_child_is_not_queued_until_every_parent_completed(drain: Any) -> None:
    job = submit("fan_out_fan_in", params={"width": 3})
    drain(limit=3)  # split, part_0, part_1
    statuses = dict(job.stages.values_list("name", "status"))
    assert statuses["part_2"] == StageStatus.QUEUED
    assert statuses["join"] == StageStatus.WAITING
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    assert 0 < job.progress < 100


@override_settings(OMNIVA_RETRY_BACKOFF_S=[2, 4, 8])
def test_a_failing_stage_is_retried_after_each_backoff(drain: Any, due: Any) -> None:
    job = submit("fail_n_times", params={"n": 2}, max_retries=3)
    before = timezone.now()
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING
    assert job.attempts == 1
    row = QueueTask.objects.get(stage_run_id=job.stages.get().pk)
    assert timedelta(seconds=1.9) <= job.next_attempt_at - before <= timedelta(seconds=3)
    assert abs((row.visible_at - job.next_attempt_at).total_seconds()) < 0.5
    assert len(drain()) == 0, "the retry must wait for its backoff"

    due(job)
    before = timezone.now()
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING
    assert timedelta(seconds=3.9) <= job.next_attempt_at - before <= timedelta(seconds=5)

    due(job)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.result == {"attempts": 3}
    assert job.attempts == 3
    warnings = JobLog.objects.filter(job=job, level="warning").count()
    assert warnings == 2


@override_settings(OMNIVA_RETRY_BACKOFF_S=[0])
def test_exhausted_retries_fail_the_job_with_the_stage_error(drain: Any) -> None:
    job = submit("fail_n_times", params={"n": 5}, max_retries=2)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.attempts == 3  # API.md: max_retries 2 → attempts 3
    assert job.error["code"] == "TRANSIENT_FAILURE"
    assert job.error["stage"] == "flaky"
    assert "Attempt 3" in job.error["message"]
    stage = job.stages.get()
    assert stage.status == StageStatus.FAILED
    assert stage.error["attempt"] == 3
    assert not QueueTask.objects.exists()


def test_a_permanent_error_fails_without_retries(drain: Any, two_stage_pipeline: Any) -> None:
    RUNS["fail_second"] = 1
    job = submit("test_two_stage", max_retries=3)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error == {"code": "BROKEN", "message": "second is broken", "stage": "second"}
    assert RUNS["second"] == 1


def test_retry_reruns_only_the_stages_that_did_not_complete(
    drain: Any, two_stage_pipeline: Any
) -> None:
    RUNS["fail_second"] = 1
    job = submit("test_two_stage", max_retries=0)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED

    RUNS["fail_second"] = 0
    services.job_retry(job_id=job.pk)
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING
    assert job.error is None
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert RUNS == {"first": 1, "second": 2, "fail_second": 0}
    assert job.result == {"got": {"from": "first"}}
    assert job.stages.get(name="second").attempt == 2


def test_a_stage_past_the_jobs_timeout_is_stopped(drain: Any) -> None:
    job = submit("sleep", params={"seconds": 30}, timeout_s=1)
    started = time.monotonic()
    drain()
    assert time.monotonic() - started < 10
    job.refresh_from_db()
    assert job.status == JobStatus.TIMED_OUT
    assert job.error["code"] == "TIMEOUT"
    assert job.stages.get().status == StageStatus.TIMED_OUT


def test_a_job_not_started_within_its_queue_timeout_times_out(drain: Any) -> None:
    job = submit("noop", queue_timeout_s=5)
    Job.objects.filter(pk=job.pk).update(pending_since=timezone.now() - timedelta(seconds=6))
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.TIMED_OUT
    assert job.error["code"] == "TIMEOUT"
    assert "queue_timeout_s" in job.error["message"]
    assert job.started_at is None


def test_cancelling_a_pending_job_cancels_it_at_once_and_drops_its_task(drain: Any) -> None:
    job = submit("noop")
    cancelled, finished_now = services.job_cancel(job_id=job.pk, reason="not needed")
    assert finished_now
    assert cancelled.status == JobStatus.CANCELLED
    assert cancelled.cancel_reason == "not needed"
    assert not QueueTask.objects.exists()
    assert len(drain()) == 0


def test_cancelling_a_running_job_stops_it_at_the_next_checkpoint(drain: Any) -> None:
    job = submit("sleep", params={"seconds": 5})
    run = job.stages.get()
    claim = services.stage_start(stage_run_id=run.pk, worker="test")
    assert claim is not None
    cancelled, finished_now = services.job_cancel(job_id=job.pk, reason="changed my mind")
    assert not finished_now
    assert cancelled.status == JobStatus.RUNNING
    with pytest.raises(StageCancelled):
        services.stage_report(stage_run_id=run.pk, token=claim.token, progress=50)
    services.stage_cancelled(stage_run_id=run.pk, token=claim.token)
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.cancel_reason == "changed my mind"
    # Whatever the stopped attempt reports afterwards is refused.
    with pytest.raises(OmnivaError) as refused:
        services.stage_complete(stage_run_id=run.pk, token=claim.token, output={})
    assert refused.value.code == ErrorCode.STAGE_LEASE_LOST


def test_cancelling_a_finished_job_is_refused(drain: Any) -> None:
    job = submit("noop")
    drain()
    with pytest.raises(OmnivaError) as refused:
        services.job_cancel(job_id=job.pk)
    assert refused.value.code == ErrorCode.JOB_NOT_CANCELLABLE
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED


def test_retrying_an_active_or_completed_job_is_refused(drain: Any) -> None:
    job = submit("noop")
    with pytest.raises(OmnivaError) as pending:
        services.job_retry(job_id=job.pk)
    assert pending.value.code == ErrorCode.JOB_NOT_RETRYABLE
    drain()
    with pytest.raises(OmnivaError) as completed:
        services.job_retry(job_id=job.pk)
    assert completed.value.code == ErrorCode.JOB_NOT_RETRYABLE


def test_a_stale_token_cannot_complete_a_stage(drain: Any) -> None:
    job = submit("noop")
    run = job.stages.get()
    first = services.stage_start(stage_run_id=run.pk, worker="slow")
    # The first worker's lease runs out; the task is delivered again.
    StageRun.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now())
    second = services.stage_start(stage_run_id=run.pk, worker="fresh")
    assert second is not None
    assert second.attempt == 2
    with pytest.raises(OmnivaError) as refused:
        services.stage_complete(stage_run_id=run.pk, token=first.token, output={"late": True})
    assert refused.value.code == ErrorCode.STAGE_LEASE_LOST
    with pytest.raises(StageLeaseLost):
        services.stage_report(stage_run_id=run.pk, token=first.token, progress=10)
    services.stage_complete(stage_run_id=run.pk, token=second.token, output={"fresh": True})
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.result == {"fresh": True}


def test_a_one_stage_job_starts_and_completes_in_one_statement_each() -> None:
    job = submit("noop")
    run = job.stages.get()
    ack_id, _task = claim_one("default")
    with CaptureQueriesContext(connection) as start:
        claim = services.stage_start(stage_run_id=run.pk, worker="test", ack_id=ack_id)
    assert claim is not None
    assert len(start.captured_queries) == 1
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
    with CaptureQueriesContext(connection) as complete:
        services.stage_complete(stage_run_id=run.pk, token=claim.token, output={"n": 1})
    assert len(complete.captured_queries) == 1
    job.refresh_from_db()
    run.refresh_from_db()
    assert (job.status, job.result, job.progress) == (JobStatus.COMPLETED, {"n": 1}, 100.0)
    assert (run.status, run.output, run.lease_token) == (StageStatus.COMPLETED, {"n": 1}, None)
    assert not QueueTask.objects.exists()  # the delivery was acknowledged with it


def test_a_one_stage_job_cancelled_while_running_ends_cancelled_though_its_stage_completed() -> (
    None
):
    job = submit("noop")
    run = job.stages.get()
    claim = services.stage_start(stage_run_id=run.pk, worker="test")
    assert claim is not None
    services.job_cancel(job_id=job.pk, reason="too late")
    services.stage_complete(stage_run_id=run.pk, token=claim.token, output={})
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.result is None


def test_a_stage_output_json_cannot_hold_fails_the_job_without_retries(
    drain: Any, two_stage_pipeline: Any
) -> None:
    job = submit("test_unserializable")
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "BAD_OUTPUT"
    assert job.attempts == 1


def test_a_stage_whose_worker_died_on_every_attempt_fails_as_worker_lost(drain: Any) -> None:
    job = submit("noop", max_retries=1)
    run = job.stages.get()
    for _ in range(2):
        assert services.stage_start(stage_run_id=run.pk, worker="doomed") is not None
        StageRun.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now())
    assert services.stage_start(stage_run_id=run.pk, worker="doomed") is None
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "WORKER_LOST"


def test_a_batch_ends_when_all_children_ended_and_aggregates_them(drain: Any) -> None:
    parent, _ = services.job_submit_batch(
        items=[
            {"pipeline": "noop"},
            {"pipeline": "fail_n_times", "params": {"n": 9}},
            {"pipeline": "fan_out_fan_in", "params": {"width": 2}},
        ],
        max_retries=0,
    )
    assert parent.status == JobStatus.RUNNING
    assert parent.children.count() == 3
    drain(limit=1)
    parent.refresh_from_db()
    assert parent.status == JobStatus.RUNNING
    drain()
    parent.refresh_from_db()
    assert parent.status == JobStatus.COMPLETED
    assert parent.progress == 100
    assert parent.result["total"] == 3
    assert [r["pipeline"] for r in parent.result["results"]] == ["noop", "fan_out_fan_in"]
    assert [e["pipeline"] for e in parent.result["errors"]] == ["fail_n_times"]
    assert parent.result["errors"][0]["error"]["code"] == "TRANSIENT_FAILURE"


def test_a_batch_whose_every_item_failed_fails(drain: Any) -> None:
    parent, _ = services.job_submit_batch(
        items=[{"pipeline": "fail_n_times", "params": {"n": 9}}] * 2, max_retries=0
    )
    drain()
    parent.refresh_from_db()
    assert parent.status == JobStatus.FAILED
    assert parent.error["code"] == "BATCH_FAILED"


@override_settings(OMNIVA_RETRY_BACKOFF_S=[0])
def test_delete_removes_a_finished_job_with_its_stages_and_logs(drain: Any) -> None:
    job = submit("fail_n_times", params={"n": 1})
    drain()
    assert JobLog.objects.filter(job=job).exists()
    services.job_delete(job_id=job.pk)
    assert not Job.objects.filter(pk=job.pk).exists()
    assert not StageRun.objects.filter(job_id=job.pk).exists()
    assert not JobLog.objects.filter(job_id=job.pk).exists()


def test_delete_refuses_an_active_job() -> None:
    job = submit("noop")
    with pytest.raises(OmnivaError) as refused:
        services.job_delete(job_id=job.pk)
    assert refused.value.code == ErrorCode.JOB_ACTIVE
    assert Job.objects.filter(pk=job.pk).exists()


def test_cleanup_deletes_only_finished_jobs_older_than_the_age(drain: Any) -> None:
    old = submit("noop")
    recent = submit("noop")
    drain()
    active = submit("noop")
    Job.objects.filter(pk=old.pk).update(finished_at=timezone.now() - timedelta(days=2))
    assert services.jobs_cleanup(max_age_s=86400) == 1
    remaining = set(Job.objects.values_list("pk", flat=True))
    assert remaining == {recent.pk, active.pk}


def test_cleanup_refuses_an_active_status() -> None:
    with pytest.raises(OmnivaError) as refused:
        services.jobs_cleanup(max_age_s=0, statuses=["running"])
    assert refused.value.code == ErrorCode.VALIDATION_ERROR


@override_settings(OMNIVA_QUEUE_LIMIT=3)
def test_a_saturated_queue_refuses_new_jobs() -> None:
    for _ in range(3):
        submit("noop")
    services.queue_depths_forget()
    with pytest.raises(OmnivaError) as refused:
        submit("noop")
    assert refused.value.code == ErrorCode.QUEUE_SATURATED
    assert refused.value.retry_after_s
    assert Job.objects.count() == 3


def test_progress_reports_move_the_job_progress_and_write_logs() -> None:
    job = submit("fan_out_fan_in", params={"width": 1})  # three stages
    run = job.stages.get(name="split")
    claim = services.stage_start(stage_run_id=run.pk, worker="test")
    services.stage_report(stage_run_id=run.pk, token=claim.token, progress=60, message="half")
    job.refresh_from_db()
    assert job.progress == 20.0
    assert JobLog.objects.filter(job=job, stage="split", message="half").exists()


@pytest.mark.django_db(transaction=True)
def test_concurrent_submits_with_one_idempotency_key_make_one_job() -> None:
    results: list[tuple[str, bool]] = []
    barrier = threading.Barrier(8)

    def submit_once() -> None:
        try:
            barrier.wait()
            job, created = services.job_submit(pipeline="noop", idempotency_key="order-42")
            results.append((str(job.pk), created))
        finally:
            connection.close()

    threads = [threading.Thread(target=submit_once) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert Job.objects.count() == 1
    assert QueueTask.objects.count() == 1


@pytest.mark.django_db(transaction=True)
@override_settings(OMNIVA_CANCEL_GRACE_S=1, OMNIVA_TASK_LEASE_S=3)
def test_a_stage_that_ignores_a_cancel_is_forced_after_the_grace(two_stage_pipeline: Any) -> None:
    from tests.jobs.conftest import claim_one, run_delivery

    job = submit("test_stubborn", params={"seconds": 20})

    def cancel_when_running() -> None:
        try:
            wait_for(lambda: Job.objects.get(pk=job.pk).status == JobStatus.RUNNING, timeout=10)
            services.job_cancel(job_id=job.pk, reason="stop")
        finally:
            connection.close()

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    started = time.monotonic()
    ack_id, task = claim_one("default")
    run_delivery(ack_id, task)  # returns once the supervisor forced the stage out
    canceller.join()
    assert time.monotonic() - started < 10
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert RUNS.get("stubborn_finished") is None
    assert JobLog.objects.filter(job=job, message__contains="forced").exists()
    assert not QueueTask.objects.exists()


def test_a_delivery_that_arrives_before_the_attempts_lease_ran_out_is_deferred() -> None:
    job = submit("noop")
    run = job.stages.get()
    ack_id, _task = claim_one("default")
    claim = services.stage_start(stage_run_id=run.pk, worker="first", ack_id=ack_id)
    assert claim is not None
    # The row's lease ran out a moment before the attempt's did: it comes back early.
    QueueTask.objects.update(visible_at=timezone.now())
    early_ack, _ = claim_one("default")
    assert services.stage_start(stage_run_id=run.pk, worker="second", ack_id=early_ack) is None
    row = QueueTask.objects.get()
    run.refresh_from_db()
    assert row.visible_at > run.lease_expires_at
    assert f"{row.pk}:{row.deliveries}" != early_ack, "its acknowledgement must not delete it"
