"""SIGKILL while a worker's completer holds ends it has not written (jobs/completer.py):
a worker process, then the whole cluster. Those attempts keep their leases and queue
rows, so they are delivered again after the lease and run again; no job is lost, none
completes twice, and the late ends of the killed attempts are refused by their tokens."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from django.db import transaction

from jobs import services
from jobs.models import Job, JobStatus, StageRun, StageStatus
from omniva.errors import OmnivaError
from omniva.models import Activity
from tests.conftest import ProcessGroup, start_worker, wait_for
from tests.jobs.conftest import (  # noqa: F401 (the autouse fixtures of tests/jobs/)
    fresh_saturation_cache,
    stop_job_listener,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SOLE_JOBS = 30
DAG_JOBS = 5
# Long enough that every end waits in a completer when the kill comes; the lease short,
# so the stream goes on soon after it.
CLUSTER = {
    "OMNIVA_COMPLETER_TICK_MS": "2000",
    "OMNIVA_TASK_LEASE_S": "4",
    "OMNIVA_WORKERS": "2",
}


def submit_stream() -> list[Job]:
    with transaction.atomic():
        sole = [services.job_submit(pipeline="noop", params={})[0] for _ in range(SOLE_JOBS)]
        dags = [
            services.job_submit(pipeline="fan_out_fan_in", params={"width": 2})[0]
            for _ in range(DAG_JOBS)
        ]
    return sole + dags


def started_cluster(processes: ProcessGroup, database_url: str, log: Path) -> int:
    """A qcluster whose two workers are up: its pid."""
    cluster = start_worker(processes, database_url, log, **CLUSTER)
    wait_for(lambda: len(worker_processes(cluster.pid)) == 2, timeout=60, what="the workers")
    return cluster.pid


def first_stages(jobs: list[Job]) -> list[int]:
    """The stage runs of `jobs` that are queued from the start (not waiting for parents)."""
    runs = StageRun.objects.filter(job__in=jobs).exclude(status=StageStatus.WAITING)
    return list(runs.values_list("pk", flat=True))


def worker_processes(cluster_pid: int) -> list[psutil.Process]:
    """The worker processes of a qcluster (django-q2 titles them idle or processing)."""
    workers = []
    for child in psutil.Process(cluster_pid).children(recursive=True):
        words = " ".join(child.cmdline()).split()  # setproctitle pads with empty args
        if words[-1:] == ["idle"] or "processing" in words:
            workers.append(child)
    return workers


def ran_unwritten(runs: list[int]) -> dict[int, StageRun] | None:
    """Every given stage run started and none of them ended yet: their ends wait in a
    completer (the stages are no-ops)."""
    rows = {run.pk: run for run in StageRun.objects.filter(pk__in=runs)}
    if all(run.status == StageStatus.RUNNING for run in rows.values()):
        return rows
    return None


def late_ends_refused(killed: dict[int, StageRun]) -> int:
    refused = 0
    for run in killed.values():
        try:
            services.stage_complete(stage_run_id=run.pk, token=str(run.lease_token), output={})
        except OmnivaError:
            refused += 1
    return refused


def completions_per_job(jobs: list[Job]) -> dict[str, int]:
    return {
        str(job.pk): Activity.objects.filter(
            job_id=job.pk, kind="job:update", data__status=JobStatus.COMPLETED
        ).count()
        for job in jobs
    }


def check_the_stream(
    jobs: list[Job], killed: dict[int, StageRun], fault_report: Callable[..., None], log: Path
) -> None:
    def all_finished() -> bool:
        return not Job.objects.filter(pk__in=[j.pk for j in jobs], finished_at__isnull=True)

    wait_for(all_finished, timeout=120, interval=0.2, what=f"every job\n{log.read_text()[-3000:]}")
    finished = list(Job.objects.filter(pk__in=[job.pk for job in jobs]))
    completed = [job for job in finished if job.status == JobStatus.COMPLETED]
    again = {run.pk: run for run in StageRun.objects.filter(pk__in=list(killed))}
    refused = late_ends_refused(killed)
    counts = completions_per_job(jobs)
    fault_report(
        submitted=len(jobs),
        ends_unwritten_at_kill=len(killed),
        attempts_run_again=sum(again[pk].attempt == killed[pk].attempt + 1 for pk in killed),
        late_ends_refused=refused,
        completed=len(completed),
        jobs_lost=len(jobs) - len(completed),
        duplicated_effects=sum(count - 1 for count in counts.values() if count > 1),
    )
    assert len(completed) == len(jobs), [(job.status, job.error) for job in finished]
    assert all(count == 1 for count in counts.values()), counts
    assert all(again[pk].attempt == killed[pk].attempt + 1 for pk in killed)
    assert refused == len(killed)
    assert len(killed) >= SOLE_JOBS + DAG_JOBS
    sums = {job.result["sum_of_squares"] for job in completed if job.pipeline != "noop"}
    assert sums == {1}, "every DAG's result is whole"


def test_worker_processes_killed_with_ends_unwritten_lose_no_job_and_complete_each_once(
    processes: ProcessGroup,
    test_database_url: str,
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    log = tmp_path / "qcluster.log"
    cluster_pid = started_cluster(processes, test_database_url, log)
    jobs = submit_stream()
    # Then a long stage for each worker: it is killed in the middle of it, not while it
    # waits for a task (a process killed inside a read of django-q2's task queue takes
    # the queue's lock with it, and no worker of the cluster gets a task again).
    with transaction.atomic():
        sleepers = [
            services.job_submit(pipeline="sleep", params={"seconds": 30}, priority=1)[0]
            for _ in range(2)
        ]
    roots = first_stages(jobs + sleepers)

    def both_asleep() -> list[psutil.Process]:
        busy = [
            process
            for process in worker_processes(cluster_pid)
            if "sleep.sleep" in " ".join(process.cmdline())
        ]
        return busy if len(busy) == 2 else []

    wait_for(lambda: ran_unwritten(roots), timeout=60, what="every first stage to run")
    busy = wait_for(both_asleep, timeout=30, what="both workers in a long stage")
    killed = ran_unwritten(roots)
    assert killed is not None, "the kill came after the completers wrote"
    for process in busy:
        process.send_signal(signal.SIGKILL)
    for sleeper in sleepers:  # done with: cancelled, so the stream ends without them
        services.job_cancel(job_id=sleeper.pk, reason="test")
    killed = {pk: run for pk, run in killed.items() if run.job_id not in {s.pk for s in sleepers}}

    # django-q2 starts new workers; the killed attempts come back after their lease.
    check_the_stream(jobs, killed, fault_report, log)
    assert psutil.pid_exists(cluster_pid)


def test_a_whole_cluster_killed_with_ends_unwritten_loses_no_job_and_completes_each_once(
    processes: ProcessGroup,
    test_database_url: str,
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    cluster_pid = started_cluster(processes, test_database_url, tmp_path / "qcluster.log")
    jobs = submit_stream()
    roots = first_stages(jobs)

    killed = wait_for(lambda: ran_unwritten(roots), timeout=60, what="every first stage to run")
    os.killpg(cluster_pid, signal.SIGKILL)

    start_worker(processes, test_database_url, tmp_path / "qcluster-2.log", **CLUSTER)
    check_the_stream(jobs, killed, fault_report, tmp_path / "qcluster-2.log")
