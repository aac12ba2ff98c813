"""Schedules: a pipeline with params on django-q2's scheduler (cron or interval), made
through the API or the admin; a due run submits its job once."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.models import Schedule as QSchedule
from django_q.scheduler import scheduler

from jobs.models import Job, JobStatus
from omniva.models import Project, Scope
from publishing import services
from publishing.models import Schedule
from tests.conftest import KeyHandle, ProcessGroup, start_worker, wait_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def project() -> Project:
    return Project.objects.create(name="studio")


def send(client: Any, method: str, path: str, body: Any = None, **headers: str) -> Any:
    return getattr(client, method)(
        path, data=json.dumps(body), content_type="application/json", **headers
    )


def make_due(schedule: Schedule) -> None:
    QSchedule.objects.filter(pk=schedule.q_schedule_id).update(
        next_run=timezone.now() - timedelta(seconds=1)
    )


def test_a_schedule_made_through_the_api_is_on_django_q2s_scheduler(
    api: Any, project: Project
) -> None:
    made = send(
        api,
        "post",
        "/v1/schedules",
        {"project": str(project.pk), "name": "nightly", "pipeline": "sleep",
         "params": {"seconds": 0}, "cron": "0 3 * * *", "priority": "high"},
    )  # fmt: skip
    assert made.status_code == 201, made.json()
    data = made.json()["data"]
    assert (data["pipeline"], data["cron"], data["interval_s"], data["priority"]) == (
        "sleep", "0 3 * * *", None, 8,
    )  # fmt: skip
    q = Schedule.objects.get(pk=data["id"]).q_schedule
    assert (q.func, q.schedule_type, q.cron, q.repeats) == (
        services.FIRE_TASK, QSchedule.CRON, "0 3 * * *", -1,
    )  # fmt: skip
    next_run = timezone.datetime.fromisoformat(data["next_run_at"])
    assert (next_run.hour, next_run.minute) == (3, 0)
    assert next_run > timezone.now()


def test_an_interval_schedule_runs_every_so_many_minutes_and_can_switch_to_cron(
    api: Any, project: Project
) -> None:
    made = send(
        api, "post", "/v1/schedules",
        {"project": str(project.pk), "pipeline": "noop", "interval_s": 300},
    ).json()["data"]  # fmt: skip
    q = Schedule.objects.get(pk=made["id"]).q_schedule
    assert (q.schedule_type, q.minutes) == (QSchedule.MINUTES, 5)
    due_in = timezone.datetime.fromisoformat(made["next_run_at"]) - timezone.now()
    assert timedelta(minutes=4) < due_in <= timedelta(minutes=5)

    changed = send(api, "patch", f"/v1/schedules/{made['id']}", {"cron": "*/10 * * * *"})
    assert changed.status_code == 200, changed.json()
    assert (changed.json()["data"]["cron"], changed.json()["data"]["interval_s"]) == (
        "*/10 * * * *", None,
    )  # fmt: skip
    q.refresh_from_db()
    assert (q.schedule_type, q.cron) == (QSchedule.CRON, "*/10 * * * *")


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"pipeline": "no_such_pipeline", "interval_s": 60}, "UNKNOWN_PIPELINE", "pipeline"),
        ({"pipeline": "sleep", "params": {"seconds": "x"}, "interval_s": 60},
         "VALIDATION_ERROR", "params.seconds"),
        ({"pipeline": "noop", "cron": "0 3 * * *", "interval_s": 60}, "VALIDATION_ERROR", "cron"),
        ({"pipeline": "noop"}, "VALIDATION_ERROR", "cron"),
        ({"pipeline": "noop", "cron": "every day at noon"}, "VALIDATION_ERROR", "cron"),
        ({"pipeline": "noop", "interval_s": 90}, "VALIDATION_ERROR", "interval_s"),
        ({"pipeline": "noop", "interval_s": 30}, "VALIDATION_ERROR", "interval_s"),
    ],
)  # fmt: skip
def test_a_bad_schedule_is_refused_and_nothing_is_made(
    api: Any, project: Project, body: dict[str, Any], code: str, field: str
) -> None:
    answer = send(api, "post", "/v1/schedules", {"project": str(project.pk), **body})
    assert answer.status_code == 400, answer.json()
    error = answer.json()["error"]
    assert error["code"] == code
    assert field in error["details"]
    assert not Schedule.objects.exists()
    assert not QSchedule.objects.filter(func=services.FIRE_TASK).exists()


# django-q2's scheduler closes the connection it finds: these run outside a test transaction.
@pytest.mark.django_db(transaction=True)
def test_a_due_run_submits_the_job_once_even_when_fired_twice(
    project: Project, drain: Callable[..., Any]
) -> None:
    schedule = services.schedule_create(
        project=project, pipeline="sleep", params={"seconds": 0}, interval_s=60
    )
    make_due(schedule)
    scheduler(broker=get_broker())  # what a qcluster's guard does about every 30 s
    assert len(drain("default")) == 2  # the schedule's task, then the job's stage
    job = Job.objects.get()
    assert (job.pipeline, job.params, job.project_id, job.status) == (
        "sleep", {"seconds": 0}, project.pk, JobStatus.COMPLETED,
    )  # fmt: skip
    schedule.refresh_from_db()
    assert (schedule.runs, schedule.last_job_id) == (1, job.pk)
    # The next run is a minute on; the same run fired again finds its job.
    assert schedule.q_schedule.next_run > timezone.now()
    intended = job.idempotency_key.split(":", 2)[2]
    again = services.schedule_fire(schedule_id=schedule.pk, intended_at=intended)
    assert again is not None
    assert again.pk == job.pk
    assert Job.objects.count() == 1
    schedule.refresh_from_db()
    assert schedule.runs == 1


@pytest.mark.django_db(transaction=True)
def test_an_inactive_schedule_does_not_run(project: Project, drain: Callable[..., Any]) -> None:
    schedule = services.schedule_create(project=project, pipeline="noop", interval_s=60)
    schedule = services.schedule_update(schedule=schedule, changes={"active": False})
    assert schedule.next_run_at is None
    make_due(schedule)
    scheduler(broker=get_broker())
    drain("default")
    assert not Job.objects.exists()
    # Deleted, it leaves nothing on django-q2's side either.
    services.schedule_delete(schedule=schedule)
    assert not QSchedule.objects.filter(func=services.FIRE_TASK).exists()


def test_a_bound_key_sees_and_makes_only_its_projects_schedules(
    client: Any, make_key: Callable[..., KeyHandle], project: Project
) -> None:
    other = Project.objects.create(name="elsewhere")
    theirs = services.schedule_create(project=other, pipeline="noop", interval_s=60)
    key = make_key(Scope.CONTENT, project=project).headers
    mine = send(client, "post", "/v1/schedules", {"pipeline": "noop", "interval_s": 60}, **key)
    assert mine.status_code == 201
    assert mine.json()["data"]["project"] == str(project.pk)
    listed = client.get("/v1/schedules", **key).json()["data"]
    assert [s["id"] for s in listed] == [mine.json()["data"]["id"]]
    assert client.get(f"/v1/schedules/{theirs.pk}", **key).status_code == 404
    assert send(client, "delete", f"/v1/schedules/{theirs.pk}", **key).status_code == 404
    into_other = send(
        client, "post", "/v1/schedules",
        {"project": str(other.pk), "pipeline": "noop", "interval_s": 60}, **key,
    )  # fmt: skip
    assert into_other.status_code == 400
    assert Schedule.objects.filter(project=other).count() == 1


def test_a_schedule_made_in_the_admin_is_checked_and_scheduled(
    client: Any, project: Project
) -> None:
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_superuser("root", password="pw-123456789"))
    form = {
        "project": str(project.pk), "name": "hourly", "pipeline": "noop", "params": "{}",
        "priority": "5", "cron": "", "interval_s": "", "active": "on",
    }  # fmt: skip
    refused = client.post("/admin/publishing/schedule/add/", {**form, "cron": "not cron"})
    assert refused.status_code == 200
    assert "is not a cron expression" in refused.content.decode()
    assert not Schedule.objects.exists()
    made = client.post("/admin/publishing/schedule/add/", {**form, "cron": "0 * * * *"})
    assert made.status_code == 302
    schedule = Schedule.objects.get()
    assert schedule.q_schedule is not None
    assert schedule.q_schedule.cron == "0 * * * *"


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_qcluster_fires_a_due_schedule_and_runs_its_job(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    project = Project.objects.create(name="studio")
    schedule = services.schedule_create(
        project=project, pipeline="sleep", params={"seconds": 0}, interval_s=60
    )
    make_due(schedule)
    log = tmp_path / "qcluster.log"
    start_worker(processes, test_database_url, log)

    def completed() -> bool:
        job = Job.objects.filter(project=project).first()
        return job is not None and job.status == JobStatus.COMPLETED

    # The guard runs the scheduler about every 30 s.
    wait_for(completed, timeout=90, interval=0.2, what=f"the scheduled job (log: {log})")
    schedule.refresh_from_db()
    assert schedule.runs == 1
    assert Job.objects.filter(project=project).count() == 1
