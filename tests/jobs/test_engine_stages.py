"""Stages that run on engines: the orchestrator's side of their events."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from engines import services as engines
from engines.models import Event, EventStatus
from jobs import services
from jobs.models import Job, JobStatus, StageStatus
from omniva.errors import ErrorCode, OmnivaError

pytestmark = pytest.mark.django_db


def submit_echo(message: str = "hi", **kwargs: Any) -> Job:
    job, _ = services.job_submit(pipeline="engine_echo", params={"message": message}, **kwargs)
    return job


def claim_one(engine_name: str = "echo-1") -> Event:
    engine = engines.engine_register(engine_type="echo", name=engine_name)
    [event] = engines.events_claim(engine_type="echo", engine_id=engine.pk, batch_size=1)
    return event


def test_an_engine_stage_becomes_an_event_with_the_jobs_params_and_priority() -> None:
    job = submit_echo("hello", priority=8)
    event = Event.objects.get()
    assert event.engine_type == "echo"
    assert event.event_type.name == "echo"
    assert event.priority == 8
    assert event.data == {
        "job_id": str(job.pk),
        "pipeline": "engine_echo",
        "stage": "echo",
        "params": {"message": "hello"},
        "inputs": {},
    }
    assert event.stage_run_id == job.stages.get().pk
    assert job.stages.get().status == StageStatus.QUEUED


def test_a_stage_events_activity_rows_carry_its_job_and_project() -> None:
    from omniva.models import Activity, Project

    project = Project.objects.create(name="scoped")
    job = submit_echo(project=project)
    event = claim_one()
    engines.event_update_status(
        event_id=event.pk, status="completed", result={"ok": 1}, lease_token=event.lease_token
    )
    rows = Activity.objects.filter(kind="event:update").order_by("id")
    # created, claimed (the claim statement), completed
    assert [(r.data["status"], r.job_id, r.project_id) for r in rows] == [
        ("pending", job.pk, project.pk),
        ("leased", job.pk, project.pk),
        ("completed", job.pk, project.pk),
    ]


def test_a_claim_marks_the_stage_running_on_that_engine(
    django_capture_on_commit_callbacks: Any,
) -> None:
    job = submit_echo()
    with django_capture_on_commit_callbacks(execute=True):
        claim_one("echo-7")
    run = job.stages.get()
    assert (run.status, run.worker, run.attempt) == (StageStatus.RUNNING, "echo-7", 1)
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING


def test_the_engines_completion_completes_the_job_with_its_result(
    django_capture_on_commit_callbacks: Any,
) -> None:
    job = submit_echo()
    with django_capture_on_commit_callbacks(execute=True):
        event = claim_one()
    engines.event_update_status(
        event_id=event.pk, status="completed", result={"echo": "hi"}, lease_token=event.lease_token
    )
    job.refresh_from_db()
    assert (job.status, job.result) == (JobStatus.COMPLETED, {"echo": "hi"})
    assert job.stages.get().output == {"echo": "hi"}


def test_a_completion_before_the_claims_callback_ran_still_completes_the_job() -> None:
    job = submit_echo()
    event = claim_one()  # on_commit callbacks do not run inside the test's transaction
    engines.event_update_status(
        event_id=event.pk, status="completed", result={"echo": "hi"}, lease_token=event.lease_token
    )
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert job.stages.get().worker == "echo-1"


def test_progress_reports_move_the_jobs_progress(django_capture_on_commit_callbacks: Any) -> None:
    job = submit_echo()
    with django_capture_on_commit_callbacks(execute=True):
        event = claim_one()
    with django_capture_on_commit_callbacks(execute=True):
        engines.event_update_status(
            event_id=event.pk, status="processing", progress=40, lease_token=event.lease_token
        )
    job.refresh_from_db()
    assert job.progress == 40.0


def test_a_dead_lettered_event_fails_the_job_with_the_engines_error() -> None:
    job = submit_echo(max_retries=0)
    event = claim_one()
    engines.event_update_status(
        event_id=event.pk,
        status="failed",
        error={"code": "NO_GPU", "message": "none left"},
        lease_token=event.lease_token,
    )
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error == {"code": "NO_GPU", "message": "none left", "stage": "echo"}
    assert Event.objects.get().status == EventStatus.DEAD_LETTERED


def test_the_jobs_max_retries_is_the_events_retry_allowance() -> None:
    job = submit_echo(max_retries=1)
    engine = engines.engine_register(engine_type="echo", name="e")
    [event] = engines.events_claim(engine_type="echo", engine_id=engine.pk)
    engines.event_update_status(
        event_id=event.pk, status="failed", error="once", lease_token=event.lease_token
    )
    job.refresh_from_db()
    assert job.status != JobStatus.FAILED  # one retry left
    assert Event.objects.get().status == EventStatus.PENDING


def test_cancelling_the_job_dead_ends_its_event_and_refuses_the_engines_report() -> None:
    job = submit_echo()
    event = claim_one()
    cancelled, finished_now = services.job_cancel(job_id=job.pk, reason="not needed")
    assert finished_now
    assert cancelled.status == JobStatus.CANCELLED
    stored = Event.objects.get()
    assert stored.status == EventStatus.DEAD_LETTERED
    assert stored.error["code"] == "STAGE_ENDED"
    with pytest.raises(OmnivaError) as refused:
        engines.event_update_status(
            event_id=event.pk, status="completed", result={}, lease_token=event.lease_token
        )
    assert refused.value.code == ErrorCode.EVENT_LEASE_LOST
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED


def test_cancelling_a_job_whose_event_waits_dead_ends_it_before_any_claim() -> None:
    job = submit_echo()
    services.job_cancel(job_id=job.pk)
    assert Event.objects.get().status == EventStatus.DEAD_LETTERED
    engine = engines.engine_register(engine_type="echo", name="late")
    assert engines.events_claim(engine_type="echo", engine_id=engine.pk) == []


def test_retrying_a_failed_engine_job_queues_a_fresh_event() -> None:
    job = submit_echo(max_retries=0)
    event = claim_one()
    engines.event_update_status(
        event_id=event.pk, status="failed", error="x", lease_token=event.lease_token
    )
    services.job_retry(job_id=job.pk)
    assert Event.objects.filter(status=EventStatus.PENDING).count() == 1
    assert Event.objects.count() == 2


def test_the_event_of_an_ended_stage_cannot_be_requeued() -> None:
    job = submit_echo(max_retries=0)
    event = claim_one()
    engines.event_update_status(
        event_id=event.pk, status="failed", error="x", lease_token=event.lease_token
    )
    with pytest.raises(OmnivaError) as refused:
        engines.event_requeue(event_id=event.pk)
    assert refused.value.code == ErrorCode.CONFLICT
    assert Event.objects.get().status == EventStatus.DEAD_LETTERED
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED


def test_a_job_claimed_by_an_engine_after_its_queue_timeout_times_out(
    django_capture_on_commit_callbacks: Any,
) -> None:
    job = submit_echo(queue_timeout_s=5)
    Job.objects.filter(pk=job.pk).update(pending_since=timezone.now() - timedelta(seconds=6))
    with django_capture_on_commit_callbacks(execute=True):
        claim_one()
    job.refresh_from_db()
    assert job.status == JobStatus.TIMED_OUT
    assert job.error["code"] == "TIMEOUT"
    assert Event.objects.get().status == EventStatus.DEAD_LETTERED
