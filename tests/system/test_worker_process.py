"""Real `qcluster` processes on our broker: a DAG job end to end, cancel, redelivery,
and a graceful stop."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from django.db import transaction

from jobs import services
from jobs.models import Job, JobLog, JobStatus, QueueTask, StageRun, StageStatus
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Activity
from tests.conftest import ProcessGroup, start_worker, wait_for
from tests.jobs.conftest import (  # noqa: F401 (the autouse fixtures of tests/jobs/)
    fresh_saturation_cache,
    stop_job_listener,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def job_status(job: Job) -> str:
    job.refresh_from_db()
    return job.status


def stage_process(job: Job) -> int | None:
    """The pid of the worker process that the job's stage names, once it names one
    running a task (not the cluster that claimed it)."""
    pid = int(job.stages.get().worker.rsplit(":", 1)[1])
    with contextlib.suppress(psutil.NoSuchProcess):
        if "processing" in " ".join(psutil.Process(pid).cmdline()):
            return pid
    return None


def test_a_qcluster_worker_runs_a_dag_job_to_completion(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    start_worker(processes, test_database_url, tmp_path / "qcluster.log")
    job, _ = services.job_submit(pipeline="fan_out_fan_in", params={"width": 3})

    wait_for(
        lambda: job_status(job) == JobStatus.COMPLETED,
        timeout=60,
        interval=0.1,
        what=f"the job to complete (log: {(tmp_path / 'qcluster.log').read_text()[-2000:]})",
    )
    assert job.result == {"parts": [0, 1, 2], "sum_of_squares": 5}
    stages = list(job.stages.all())
    assert all(stage.status == StageStatus.COMPLETED for stage in stages)
    workers = {stage.worker.rsplit(":", 1)[1] for stage in stages}
    assert str(os.getpid()) not in workers
    assert not QueueTask.objects.exists(), "every delivery is acknowledged"


def test_a_running_job_cancelled_stops_at_its_next_checkpoint(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    start_worker(processes, test_database_url, tmp_path / "qcluster.log")
    job, _ = services.job_submit(pipeline="sleep", params={"seconds": 60})
    wait_for(lambda: job_status(job) == JobStatus.RUNNING, timeout=60, what="the job to start")

    _, finished_now = services.job_cancel(job_id=job.pk, reason="operator")
    assert not finished_now

    wait_for(lambda: job_status(job) == JobStatus.CANCELLED, timeout=15, what="the cancel")
    assert job.cancel_reason == "operator"
    assert job.stages.get().status == StageStatus.CANCELLED


def test_a_worker_killed_mid_stage_loses_its_lease_and_the_stage_runs_again(
    processes: ProcessGroup,
    test_database_url: str,
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    start_worker(processes, test_database_url, tmp_path / "qcluster.log", OMNIVA_TASK_LEASE_S="2")
    job, _ = services.job_submit(pipeline="sleep", params={"seconds": 4})
    wait_for(lambda: job_status(job) == JobStatus.RUNNING, timeout=60, what="the job to start")
    killed = job.stages.get()
    # The start in the broker's claim names the cluster; the first heartbeat (a third
    # of the lease) names the worker process that runs the stage.
    worker_pid = wait_for(lambda: stage_process(job), timeout=10, what="the first heartbeat")

    os.kill(worker_pid, signal.SIGKILL)

    wait_for(
        lambda: job_status(job) == JobStatus.COMPLETED,
        timeout=60,
        interval=0.1,
        what="the stage to be delivered again and complete",
    )
    stage = job.stages.get()
    assert stage.attempt == 2
    assert int(stage.worker.rsplit(":", 1)[1]) != worker_pid
    assert JobLog.objects.filter(job=job, message__contains="stopped responding").exists()
    assert job.result == {"slept_s": 4}

    # The killed attempt's result, arriving late (a worker that was only paused, a
    # network partition), holds a token that no longer matches: refused, nothing changes.
    with pytest.raises(OmnivaError) as refused:
        services.stage_complete(
            stage_run_id=killed.pk, token=str(killed.lease_token), output={"slept_s": -1}
        )
    assert refused.value.code == ErrorCode.STAGE_LEASE_LOST
    job.refresh_from_db()
    stage.refresh_from_db()
    assert job.result == {"slept_s": 4}
    assert stage.output == {"slept_s": 4}
    completions = Activity.objects.filter(
        job_id=job.pk, kind="job:update", data__status=JobStatus.COMPLETED
    ).count()
    fault_report(
        attempts=stage.attempt,
        late_completion_refused=1,
        job_completions=completions,
        jobs_lost=0 if job.status == JobStatus.COMPLETED else 1,
        duplicated_effects=completions - 1,
    )
    assert completions == 1, "the job's result is written once"


def _notify_queue_pages(database_url: str) -> float:
    """How many pages of PostgreSQL's NOTIFY queue are in use (not yet read by every
    listening session)."""
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_notification_queue_usage() * current_setting('max_notify_queue_pages')::int"
        ).fetchone()
    assert row is not None
    return float(row[0])


def test_thousands_of_transitions_with_a_cluster_running_leave_the_notify_queue_empty(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path, fault_report
) -> None:
    # Every transition notifies. A session that listens and does not read (a cluster's
    # start-up ping used to) holds the queue's tail where it was: the pages pile up
    # until the queue is full and every notifying commit fails.
    start_worker(processes, test_database_url, tmp_path / "qcluster.log")
    jobs = [services.job_submit(pipeline="noop")[0] for _ in range(3000)]
    last = jobs[-1]
    wait_for(
        lambda: (
            job_status(last) == JobStatus.COMPLETED
            and not Job.objects.exclude(status=JobStatus.COMPLETED).exists()
        ),
        timeout=240,
        interval=0.5,
        what="every job to complete",
    )
    # Each listening session reads what it was sent and the tail follows, a few pages
    # at a time (PostgreSQL trims the queue every few pages).
    wait_for(
        lambda: _notify_queue_pages(test_database_url) <= 8,
        timeout=30,
        interval=0.5,
        what="the NOTIFY queue to be read by every listening session",
    )
    fault_report(jobs=len(jobs), notify_queue_pages=_notify_queue_pages(test_database_url))


def test_an_urgent_job_behind_a_backlog_of_long_stages_starts_at_the_first_free_worker(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "qcluster.log"
    start_worker(processes, test_database_url, log, OMNIVA_WORKERS="2")
    backlog = [
        services.job_submit(pipeline="sleep", params={"seconds": 3}, priority="low")[0]
        for _ in range(12)
    ]
    running = Job.objects.filter(pk__in=[job.pk for job in backlog], status=JobStatus.RUNNING)
    wait_for(lambda: running.count() == 2, timeout=60, what=f"two stages to run ({log})")

    # Both workers are a moment into their 3 s stages: the next free one takes the urgent job.
    urgent, _ = services.job_submit(pipeline="noop", priority="urgent")
    wait_for(lambda: job_status(urgent) == JobStatus.COMPLETED, timeout=30, what="the urgent job")
    started_before_it = Job.objects.filter(
        pk__in=[job.pk for job in backlog],
        started_at__gt=urgent.created_at,
        started_at__lt=urgent.started_at,
    ).count()
    # It is claimed by the first worker that frees; the other worker, freeing at the
    # same moment (their stages started together), may commit its next start first.
    # With a buffer ahead of the workers, the buffer's stages all started ahead of it.
    assert started_before_it <= 1, f"{started_before_it} backlog stages started ahead of it"
    claimed = QueueTask.objects.filter(deliveries__gt=0).count()
    assert claimed <= 2, f"{claimed} tasks claimed by 2 workers: the pusher fetched ahead"


def test_a_cluster_stopped_mid_stream_leaves_no_stage_started_and_counts_no_attempt(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    """A graceful stop while the pusher holds tasks it claimed ahead (their stages
    started): they go back to the queue uncounted, so jobs without retries left do not
    fail as lost when the next cluster takes them."""
    with transaction.atomic():
        jobs = [services.job_submit(pipeline="noop", max_retries=0)[0] for _ in range(1500)]
    log = tmp_path / "qcluster.log"
    cluster = start_worker(processes, test_database_url, log)
    wait_for(
        lambda: Job.objects.filter(status=JobStatus.COMPLETED).count() >= 200,
        timeout=60,
        what="the stream to flow",
    )

    cluster.send_signal(signal.SIGTERM)
    assert cluster.wait(timeout=60) == 0, log.read_text()[-3000:]

    assert not StageRun.objects.filter(status=StageStatus.RUNNING).exists(), "left started"
    start_worker(processes, test_database_url, tmp_path / "qcluster-2.log")
    wait_for(
        lambda: not Job.objects.filter(finished_at__isnull=True).exists(),
        timeout=120,
        what="every job",
    )
    finished = Job.objects.filter(pk__in=[job.pk for job in jobs])
    assert set(finished.values_list("status", flat=True)) == {JobStatus.COMPLETED}
    assert set(finished.values_list("attempts", flat=True)) == {1}
