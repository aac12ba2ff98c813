"""A submission writes its job, stages, activity rows and queued tasks in one statement,
atomic by itself: what it stores is what the ORM stored, and nothing is half-written."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from engines.models import Event
from jobs import services
from jobs.models import Job, QueueTask, StageRun
from omniva.models import Activity

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_submission_is_two_statements_without_a_transaction_of_its_own() -> None:
    services.queue_guard({"default"})  # its depth is counted once a second, not per job

    with CaptureQueriesContext(connection) as statements:
        job, created = services.job_submit(pipeline="fan_out_fan_in", params={"width": 2})

    sql = [q["sql"] for q in statements.captured_queries]
    assert created
    assert len(sql) == 2, sql
    assert not any(s.strip().upper() in ("BEGIN", "COMMIT") for s in sql)
    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.params, stored.priority) == ("pending", {"width": 2}, 5)
    assert stored.created_at == job.created_at
    runs = list(StageRun.objects.filter(job=job).order_by("position"))
    assert [(r.pk, r.name, r.status) for r in runs] == [
        (r.pk, r.name, r.status) for r in job.stage_list
    ]
    assert [r.status for r in runs] == ["queued", "waiting", "waiting", "waiting"]
    assert list(QueueTask.objects.values_list("stage_run_id", "queue", "priority")) == [
        (runs[0].pk, "default", 5)
    ]
    activity = Activity.objects.filter(job_id=job.pk).order_by("id")
    assert [(a.kind, a.data["status"]) for a in activity] == [
        ("job:update", "pending"),
        ("stage:update", "queued"),
    ]


def test_a_submission_whose_tasks_cannot_be_written_leaves_nothing_behind() -> None:
    # The queue table refuses the task row (a constraint of the test's making): the job,
    # its stages and their activity rows, written by the same statement, are not kept.
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE jobs_queuetask ADD CONSTRAINT no_tasks CHECK (priority < 0) NOT VALID"
        )
    try:
        with pytest.raises(Exception, match="no_tasks"):
            services.job_submit(pipeline="noop")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE jobs_queuetask DROP CONSTRAINT no_tasks")

    assert Job.objects.count() == StageRun.objects.count() == Activity.objects.count() == 0


def test_an_engine_stage_submission_writes_its_event_with_the_job() -> None:
    job, _ = services.job_submit(pipeline="engine_echo", params={"message": "hi"})

    (run,) = StageRun.objects.filter(job=job)
    assert Event.objects.filter(stage_run_id=run.pk, job_id=job.pk).count() == 1
    assert not QueueTask.objects.exists()
