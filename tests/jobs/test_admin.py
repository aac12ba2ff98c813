"""The jobs admin: lists, filters and searches jobs; its actions go through the services."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client

from jobs import services
from jobs.models import Job, JobLog, JobStatus, QueueTask, StageRun, StageStatus
from omniva import services as core_services

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/jobs/job/"


@pytest.fixture
def staff_client(client: Client) -> Client:
    user = get_user_model().objects.create_superuser("root", password="pw-123456789")
    client.force_login(user)
    return client


def submit(pipeline: str = "noop", **kwargs: Any) -> Job:
    return services.job_submit(pipeline=pipeline, **kwargs)[0]


def completed(drain: Callable[..., Any]) -> Job:
    job = submit()
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    return job


def failed(drain: Callable[..., Any]) -> Job:
    job = submit("fail_n_times", params={"n": 1}, max_retries=0)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    return job


def running() -> Job:
    """A job whose stage a worker holds right now (a live lease)."""
    job = submit("sleep", params={"seconds": 60})
    services.stage_start(stage_run_id=StageRun.objects.get(job=job).pk, worker="test-worker")
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    return job


def act(client: Client, action: str, *jobs: Job) -> list[tuple[str, str]]:
    """Run an admin action on `jobs`; the messages it left, as (level tag, text)."""
    response = client.post(
        CHANGELIST, {"action": action, "_selected_action": [str(job.pk) for job in jobs]}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    return [(message.level_tag, str(message)) for message in get_messages(response.wsgi_request)]


def listed(page: str, *jobs: Job) -> list[bool]:
    return [str(job.pk) in page for job in jobs]


# --- changelist --------------------------------------------------------------------------


def test_changelist_shows_the_job_columns_and_every_filter(staff_client, drain) -> None:
    core_services.project_create(name="studio")
    job = completed(drain)

    page = staff_client.get(CHANGELIST).content.decode()

    assert str(job.pk) in page
    for column in ("Pipeline", "Status", "Priority", "Progress", "Attempts", "Created at"):
        assert column in page
    assert "Run time" in page
    assert "100%" in page
    for filter_title in ("By status", "By pipeline", "By priority", "By project"):
        assert filter_title in page
    assert "studio" in page  # the project filter lists the projects


def test_changelist_filters_by_status_pipeline_priority_and_project(staff_client, drain) -> None:
    project = core_services.project_create(name="studio")
    done = completed(drain)
    bad = failed(drain)
    urgent = submit("sleep", params={"seconds": 5}, priority="urgent", project=project)

    by_status = staff_client.get(CHANGELIST, {"status__exact": "failed"}).content.decode()
    by_pipeline = staff_client.get(CHANGELIST, {"pipeline": "sleep"}).content.decode()
    by_priority = staff_client.get(CHANGELIST, {"priority": "10"}).content.decode()
    by_project = staff_client.get(CHANGELIST, {"project__id__exact": project.pk}).content.decode()

    assert listed(by_status, done, urgent, bad) == [False, False, True]
    assert listed(by_pipeline, done, urgent, bad) == [False, True, False]
    assert listed(by_priority, done, urgent, bad) == [False, True, False]
    assert listed(by_project, done, urgent, bad) == [False, True, False]


def test_search_by_job_id_finds_exactly_that_job(staff_client) -> None:
    wanted, other = submit(), submit()

    page = staff_client.get(CHANGELIST, {"q": f"  {wanted.pk}  "}).content.decode()

    assert listed(page, wanted, other) == [True, False]


def test_search_with_a_term_that_is_no_uuid_finds_nothing_and_does_not_fail(staff_client) -> None:
    job = submit()

    response = staff_client.get(CHANGELIST, {"q": "not-a-uuid' OR 1=1 --"})

    assert response.status_code == 200
    assert listed(response.content.decode(), job) == [False]


def test_search_also_finds_a_job_by_its_exact_idempotency_key(staff_client) -> None:
    keyed = submit(idempotency_key="nightly-2026-01-01")
    other = submit()

    exact = staff_client.get(CHANGELIST, {"q": "nightly-2026-01-01"}).content.decode()
    partial = staff_client.get(CHANGELIST, {"q": "nightly"}).content.decode()

    assert listed(exact, keyed, other) == [True, False]
    assert listed(partial, keyed, other) == [False, False]


# --- change page -------------------------------------------------------------------------


def test_change_page_shows_the_job_with_its_stages_and_logs(staff_client, drain) -> None:
    job = submit("fan_out_fan_in", params={"width": 2})
    drain()
    JobLog.objects.create(job=job, stage="join", message="job completed")

    response = staff_client.get(f"{CHANGELIST}{job.pk}/change/")

    page = response.content.decode()
    assert response.status_code == 200
    for stage in ("split", "part_0", "part_1", "join"):
        assert stage in page
    assert "job completed" in page  # the job's log
    assert "sum_of_squares" in page  # its result


def test_status_and_every_other_field_are_read_only(staff_client, drain) -> None:
    job = failed(drain)
    url = f"{CHANGELIST}{job.pk}/change/"

    page = staff_client.get(url).content.decode()
    refused = staff_client.post(
        url, {"status": "completed", "progress": "100", "result": "{}", "error": ""}
    )

    for field in ("status", "progress", "result", "error", "finished_at", "attempts"):
        assert f'name="{field}"' not in page
    assert 'name="_save"' not in page
    assert refused.status_code == 403
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "TRANSIENT_FAILURE"
    assert job.result is None


def test_stage_and_log_rows_cannot_be_added_or_deleted_on_the_page(staff_client, drain) -> None:
    job = completed(drain)

    page = staff_client.get(f"{CHANGELIST}{job.pk}/change/").content.decode()

    assert 'name="stages-MAX_NUM_FORMS" value="0"' in page  # no room for a new row
    assert 'name="logs-MAX_NUM_FORMS" value="0"' in page
    assert "stages-0-DELETE" not in page
    assert "logs-0-DELETE" not in page


def test_jobs_cannot_be_added_in_the_admin(staff_client) -> None:
    assert staff_client.get(f"{CHANGELIST}add/").status_code == 403


# --- actions -----------------------------------------------------------------------------


def test_cancel_action_cancels_pending_jobs_through_the_service(staff_client) -> None:
    first, second = submit(), submit()

    notes = act(staff_client, "cancel_jobs", first, second)

    assert notes == [("success", "Cancelled 2 jobs.")]
    for job in (first, second):
        job.refresh_from_db()
        assert job.status == JobStatus.CANCELLED
        assert job.cancel_reason == "cancelled in the admin by root"
        assert not QueueTask.objects.filter(stage_run_id__in=job.stages.values("pk")).exists()


def test_cancel_action_asks_a_running_job_to_stop_at_its_next_checkpoint(staff_client) -> None:
    job = running()

    notes = act(staff_client, "cancel_jobs", job)

    assert notes == [
        (
            "success",
            "Cancel requested for 1 job with a running stage; they stop at their next checkpoint.",
        )
    ]
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING
    assert job.cancel_requested_at is not None


def test_cancel_action_on_a_completed_job_shows_the_refusal_and_changes_nothing(
    staff_client, drain
) -> None:
    done = completed(drain)
    pending = submit()

    notes = act(staff_client, "cancel_jobs", done, pending)

    assert ("success", "Cancelled 1 job.") in notes
    errors = [text for level, text in notes if level == "error"]
    assert len(errors) == 1
    assert str(done.pk) in errors[0]
    assert "JOB_NOT_CANCELLABLE" in errors[0]
    done.refresh_from_db()
    assert done.status == JobStatus.COMPLETED
    assert done.cancel_requested_at is None
    pending.refresh_from_db()
    assert pending.status == JobStatus.CANCELLED


def test_retry_action_reruns_failed_jobs_and_refuses_pending_ones(staff_client, drain) -> None:
    bad = failed(drain)
    pending = submit()

    notes = act(staff_client, "retry_jobs", bad, pending)

    assert ("success", "Retried 1 job.") in notes
    assert any(level == "error" and "JOB_NOT_RETRYABLE" in text for level, text in notes)
    bad.refresh_from_db()
    assert bad.status == JobStatus.PENDING
    assert StageRun.objects.get(job=bad).status == StageStatus.QUEUED
    drain()
    bad.refresh_from_db()
    assert bad.status == JobStatus.COMPLETED


def test_delete_action_deletes_finished_jobs_and_refuses_active_ones(staff_client, drain) -> None:
    done = completed(drain)
    bad = failed(drain)
    active = submit()

    notes = act(staff_client, "delete_jobs", done, bad, active)

    assert ("success", "Deleted 2 jobs.") in notes
    assert any(level == "error" and "JOB_ACTIVE" in text for level, text in notes)
    assert list(Job.objects.values_list("pk", flat=True)) == [active.pk]
    assert not StageRun.objects.filter(job_id__in=[done.pk, bad.pk]).exists()


def test_the_bulk_delete_and_the_delete_page_are_not_offered(staff_client) -> None:
    job = submit()

    page = staff_client.get(CHANGELIST).content.decode()
    bulk = staff_client.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [str(job.pk)], "post": "yes"}
    )
    delete_page = staff_client.get(f"{CHANGELIST}{job.pk}/delete/")

    assert 'value="delete_selected"' not in page
    assert 'value="cancel_jobs"' in page
    assert 'value="retry_jobs"' in page
    assert 'value="delete_jobs"' in page
    assert bulk.status_code in (200, 302)
    assert delete_page.status_code == 403
    assert Job.objects.filter(pk=job.pk).exists()


def test_a_staff_user_without_job_permissions_sees_no_actions(client) -> None:
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user("viewer", password="pw-123456789", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(user)
    job = submit()

    page = client.get(CHANGELIST).content.decode()
    response = client.post(CHANGELIST, {"action": "cancel_jobs", "_selected_action": [job.pk]})

    assert str(job.pk) in page
    assert 'value="cancel_jobs"' not in page
    assert response.status_code in (200, 302)
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING


# --- queue tasks -------------------------------------------------------------------------


def test_queue_tasks_are_listed_read_only(staff_client) -> None:
    job = submit(priority="high")
    task = QueueTask.objects.get(stage_run_id=job.stages.get().pk)

    page = staff_client.get("/admin/jobs/queuetask/").content.decode()
    change = staff_client.post(f"/admin/jobs/queuetask/{task.pk}/change/", {"priority": "0"})

    assert "ready" in page
    assert f">{task.pk}<" in page
    assert change.status_code == 403
    assert staff_client.get("/admin/jobs/queuetask/add/").status_code == 403
    task.refresh_from_db()
    assert task.priority == 8
