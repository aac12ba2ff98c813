"""`manage.py submit`, `jobs`, `cancel`, `retry` and `cleanup`.

The commands run in-process through call_command where nothing else has to happen
meanwhile. `submit --wait` has to be followed while a worker runs the job, so it runs
as a real process: against a real `qcluster`, or against this test draining the queue
in-process (both need committed rows: transaction=True).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db.models import F
from django.test import override_settings
from django.utils import timezone

from jobs import services
from jobs.management.commands.submit import parse_param
from jobs.models import Job, JobStatus, StageRun, StageStatus
from omniva.processes import manage_argv
from tests.conftest import ProcessGroup, start_worker, wait_for


@dataclass
class Output:
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.strip().splitlines()


def run(*args: str) -> Output:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return Output(out.getvalue(), err.getvalue())


def finished_summary(output: str) -> dict:
    """The JSON that `submit --wait` prints after the job id line."""
    _job_id, _, summary = output.strip().partition("\n")
    return json.loads(summary)


def submit_noop(**kwargs: object) -> Job:
    return services.job_submit(pipeline="noop", **kwargs)[0]


def failed_job(drain: Callable[..., object]) -> Job:
    job = services.job_submit(pipeline="fail_n_times", params={"n": 1}, max_retries=0)[0]
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    return job


# --- submit ----------------------------------------------------------------------------------


def test_param_values_are_read_as_json_when_they_parse_and_as_strings_otherwise() -> None:
    assert parse_param("n=5") == ("n", 5)
    assert parse_param("ratio=0.5") == ("ratio", 0.5)
    assert parse_param('tags=["a", "b"]') == ("tags", ["a", "b"])
    assert parse_param("flag=true") == ("flag", True)
    assert parse_param("name=hello world") == ("name", "hello world")
    assert parse_param("url=http://x/?a=b") == ("url", "http://x/?a=b")
    assert parse_param("empty=") == ("empty", "")
    with pytest.raises(CommandError, match="key=value"):
        parse_param("no-equals-sign")


@pytest.mark.django_db
def test_submit_creates_a_job_with_parsed_params_and_a_priority_word() -> None:
    output = run(
        "submit",
        "fan_out_fan_in",
        "--param",
        "width=2",
        "--priority",
        "urgent",
        "--max-retries",
        "1",
        "--timeout-s",
        "30",
    )

    job = Job.objects.get(pk=output.lines[0])
    assert output.lines == [str(job.pk)]
    assert job.params == {"width": 2}
    assert job.priority == 10
    assert job.max_retries == 1
    assert job.timeout_s == 30
    assert job.status == JobStatus.PENDING
    assert job.stages.count() == 4  # split, two parts, join


@pytest.mark.django_db
def test_submit_takes_a_numeric_priority_and_an_idempotency_key_returns_the_first_job() -> None:
    first = run("submit", "noop", "--priority", "8", "--idempotency-key", "nightly-1")
    again = run("submit", "noop", "--priority", "2", "--idempotency-key", "nightly-1")

    assert again.lines == first.lines
    assert "nightly-1" in again.err
    job = Job.objects.get()
    assert job.priority == 8


@pytest.mark.django_db
def test_submit_refuses_an_unknown_pipeline_with_a_non_zero_exit() -> None:
    with pytest.raises(CommandError, match="UNKNOWN_PIPELINE") as refused:
        run("submit", "no_such_pipeline")

    assert refused.value.returncode != 0
    assert not Job.objects.exists()


@pytest.mark.django_db
def test_submit_refuses_params_the_pipeline_does_not_take_and_a_bad_priority() -> None:
    with pytest.raises(CommandError, match=r"VALIDATION_ERROR.*params\.width"):
        run("submit", "fan_out_fan_in", "--param", "width=0")
    with pytest.raises(CommandError, match=r"VALIDATION_ERROR.*priority"):
        run("submit", "noop", "--priority", "whenever")
    with pytest.raises(CommandError, match=r"VALIDATION_ERROR.*priority"):
        run("submit", "noop", "--priority", "11")

    assert not Job.objects.exists()


@pytest.mark.django_db
def test_submit_wait_exits_two_with_the_job_as_it_stands_when_the_wait_runs_out() -> None:
    out, err = StringIO(), StringIO()

    with pytest.raises(SystemExit) as exited:
        call_command("submit", "noop", "--wait", "--wait-timeout-s", "0.3", stdout=out, stderr=err)

    assert exited.value.code == 2
    summary = finished_summary(out.getvalue())
    assert summary["status"] == JobStatus.PENDING
    assert Job.objects.get(pk=summary["id"]).status == JobStatus.PENDING
    assert "Still pending" in err.getvalue()


class SubmitProcess:
    """`manage.py submit …` as its own process, with stdout and stderr kept apart."""

    def __init__(
        self, processes: ProcessGroup, database_url: str, folder: Path, *args: str
    ) -> None:
        self.out_path, self.err_path = folder / "submit.out", folder / "submit.err"
        child = processes.spawn(
            manage_argv("submit", *args),
            env={"DATABASE_URL": database_url},
            log=self.out_path,
            stderr=self.err_path,
            name="manage.py submit",
        )
        assert child.popen is not None
        self.process = child.popen

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"submit did not exit; stderr:\n{self.err}") from None

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"submit exited early ({self.process.returncode}):\n{self.err}")
        return True


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_submit_wait_exits_zero_when_a_worker_completes_the_job(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    worker_log = tmp_path / "qcluster.log"
    start_worker(processes, test_database_url, worker_log)
    submit = SubmitProcess(
        processes,
        test_database_url,
        tmp_path,
        "sleep",
        "--param",
        "seconds=1",
        "--wait",
        "--wait-timeout-s",
        "120",
    )

    code = submit.wait(timeout=150)

    assert code == 0, f"{submit.err}\n--- worker:\n{worker_log.read_text()}"
    summary = finished_summary(submit.out)
    assert summary["status"] == JobStatus.COMPLETED
    assert summary["result"] == {"slept_s": 1}
    assert summary["progress"] == 100.0
    assert "sleep completed: 100%" in submit.err  # the progress bar reached its end
    assert Job.objects.get(pk=summary["id"]).status == JobStatus.COMPLETED


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_submit_wait_exits_one_when_the_job_fails(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path, drain: Callable
) -> None:
    submit = SubmitProcess(
        processes,
        test_database_url,
        tmp_path,
        "fail_n_times",
        "--param",
        "n=5",
        "--max-retries",
        "0",
        "--wait",
        "--wait-timeout-s",
        "120",
    )
    job = wait_for(
        lambda: submit.alive() and Job.objects.filter(pipeline="fail_n_times").first(),
        timeout=60,
        what="the submitted job",
    )

    drain()
    code = submit.wait(timeout=60)

    assert code == 1, submit.err
    summary = finished_summary(submit.out)
    assert summary["id"] == str(job.pk)
    assert summary["status"] == JobStatus.FAILED
    assert summary["attempts"] == 1
    assert summary["error"]["code"] == "TRANSIENT_FAILURE"
    assert "Job failed: TRANSIENT_FAILURE" in submit.err


# --- jobs ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_jobs_lists_the_newest_jobs_as_a_table_filtered_by_status_and_pipeline(drain) -> None:
    done = submit_noop()
    failed = failed_job(drain)  # drains `done` too
    waiting = services.job_submit(pipeline="sleep", params={"seconds": 5}, priority=8)[0]

    everything = run("jobs")
    header, *rows = everything.lines
    assert header.split() == [
        "ID",
        "PIPELINE",
        "STATUS",
        "PRIORITY",
        "PROGRESS",
        "ATTEMPTS",
        "CREATED",
        "RUN",
    ]
    assert [row.split()[0] for row in rows] == [str(waiting.pk), str(failed.pk), str(done.pk)]
    assert rows[0].split()[1:5] == ["sleep", "pending", "8", "0%"]
    assert rows[2].split()[1:6] == ["noop", "completed", "5", "100%", "1"]

    completed = run("jobs", "--status", "completed", "--status", "failed").out
    assert str(done.pk) in completed
    assert str(failed.pk) in completed
    assert str(waiting.pk) not in completed
    only_sleep = run("jobs", "--pipeline", "sleep").lines
    assert len(only_sleep) == 2
    assert str(waiting.pk) in only_sleep[1]
    assert len(run("jobs", "--limit", "1").lines) == 2
    assert run("jobs", "--pipeline", "nothing-ran").lines == ["No jobs."]


@pytest.mark.django_db
def test_jobs_refuses_an_unknown_status() -> None:
    with pytest.raises(CommandError, match="invalid choice"):
        run("jobs", "--status", "sleeping")


# --- cancel ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_cancel_cancels_a_pending_job_with_its_reason() -> None:
    job = submit_noop()

    output = run("cancel", str(job.pk), "--reason", "wrong params")

    assert output.lines == [f"Cancelled job {job.pk}."]
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.cancel_reason == "wrong params"


@pytest.mark.django_db
def test_cancel_of_a_running_job_asks_it_to_stop_at_its_next_checkpoint() -> None:
    job = services.job_submit(pipeline="sleep", params={"seconds": 60})[0]
    run_ = StageRun.objects.get(job=job)
    services.stage_start(stage_run_id=run_.pk, worker="test-worker")

    output = run("cancel", str(job.pk))

    assert "stops at its running stage's next checkpoint" in output.out
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    assert job.cancel_requested_at is not None


@pytest.mark.django_db
def test_cancel_refuses_a_finished_job_and_an_unknown_one(drain) -> None:
    job = submit_noop()
    drain()

    with pytest.raises(CommandError, match="JOB_NOT_CANCELLABLE"):
        run("cancel", str(job.pk))
    with pytest.raises(CommandError, match="JOB_NOT_FOUND"):
        run("cancel", str(uuid.uuid4()))

    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.cancel_requested_at is None


# --- retry -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_retry_reruns_a_failed_job_which_then_completes(drain) -> None:
    job = failed_job(drain)

    output = run("retry", str(job.pk))

    assert output.lines == [f"Retried job {job.pk}: pending, 1 of 1 stages rerun."]
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING
    assert StageRun.objects.get(job=job).status == StageStatus.QUEUED
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.result == {"attempts": 2}


@pytest.mark.django_db
def test_retry_refuses_a_job_that_has_not_ended() -> None:
    job = submit_noop()

    with pytest.raises(CommandError, match="JOB_NOT_RETRYABLE"):
        run("retry", str(job.pk))

    job.refresh_from_db()
    assert job.status == JobStatus.PENDING


# --- cleanup ---------------------------------------------------------------------------------


def _finished_ago(job: Job, seconds: int) -> None:
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(seconds=seconds))


@pytest.mark.django_db
def test_cleanup_clears_finished_jobs_older_than_max_age_and_keeps_the_rest(drain) -> None:
    old_done = submit_noop()
    recent_done = submit_noop()
    drain()
    old_failed = failed_job(drain)
    active = submit_noop()
    for job in (old_done, old_failed):
        _finished_ago(job, 7200)

    only_failed = run("cleanup", "--max-age-s", "3600", "--status", "failed")
    assert only_failed.lines[0] == "Cleared 1 job finished over 3600 s ago."
    assert not Job.objects.filter(pk=old_failed.pk).exists()

    with override_settings(OMNIVA_JOB_RETENTION_DAYS=1):
        by_default_age = run("cleanup")
    assert by_default_age.lines[0] == "Cleared 0 jobs finished over 86400 s ago."

    rest = run("cleanup", "--max-age-s", "3600")
    assert rest.lines[0] == "Cleared 1 job finished over 3600 s ago."
    assert set(Job.objects.values_list("pk", flat=True)) == {recent_done.pk, active.pk}


@pytest.mark.django_db
def test_cleanup_prunes_audit_records_and_activity_past_their_retention() -> None:
    from omniva.models import Activity, AuditRecord
    from omniva.services import activity_record

    activity_record(kind="job:update", data={"old": True})
    activity_record(kind="job:update", data={"old": False})
    old = Activity.objects.order_by("id").first()
    Activity.objects.filter(pk=old.pk).update(at=timezone.now() - timedelta(days=8))
    for request_id, age in (("old", timedelta(days=31)), ("new", timedelta(0))):
        AuditRecord.objects.create(
            request_id=request_id,
            at=timezone.now() - age,
            method="GET",
            path="/v1/x",
            status=200,
            duration_ms=1,
        )
    with override_settings(OMNIVA_ACTIVITY_RETENTION_DAYS=7, OMNIVA_AUDIT_RETENTION_DAYS=30):
        output = run("cleanup")
    assert output.lines[1:3] == [
        "Pruned 1 audit records older than 30 days.",
        "Pruned 1 activity rows older than 7 days.",
    ]
    assert list(Activity.objects.values_list("data", flat=True)) == [{"old": False}]
    assert list(AuditRecord.objects.values_list("request_id", flat=True)) == ["new"]


@pytest.mark.django_db
def test_cleanup_dead_letters_events_whose_last_lease_ran_out_of_every_engine_type() -> None:
    from engines import services as engines
    from engines.models import Event, EventStatus

    for engine_type in ("gone", "also-gone", "alive"):
        kind = engines.event_type_create(name=f"{engine_type}-work", engine_type=engine_type)
        engines.event_create(event_type=kind, data={})
        engines.events_claim_now(engine_type=engine_type, engine=None, batch_size=1)
    Event.objects.update(retry_count=F("max_retries"))
    Event.objects.exclude(engine_type="alive").update(
        lock_until=timezone.now() - timedelta(seconds=1)
    )

    output = run("cleanup")

    assert output.lines[-1] == "Moved 2 events whose last lease ran out to the dead letter queue."
    statuses = dict(Event.objects.values_list("engine_type", "status"))
    assert statuses == {
        "gone": EventStatus.DEAD_LETTERED,
        "also-gone": EventStatus.DEAD_LETTERED,
        "alive": EventStatus.LEASED,
    }


@pytest.mark.django_db
def test_cleanup_refuses_an_active_status() -> None:
    with pytest.raises(CommandError, match="invalid choice"):
        run("cleanup", "--status", "running")
