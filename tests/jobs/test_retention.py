"""Retention runs by itself: a django-q2 schedule made by a migration fires a pass in the
default cluster; a pass deletes, in batches of short transactions, activity rows, audit
records, finished events and finished jobs past their retention and keeps the rest; and
the figures the live feed reads every 5 s read a bounded number of rows however many the
tables hold."""

from __future__ import annotations

import pydoc
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.brokers import get_broker
from django_q.models import Schedule as QSchedule
from django_q.scheduler import scheduler

import jobs.selectors
import omniva.selectors
import omniva.services
from engines import services as engines
from engines.models import Event, EventStatus
from jobs import broker, services, tasks
from jobs.models import Job, JobLog, JobStatus, QueueTask, StageRun
from omniva import health
from omniva.models import Activity, AuditRecord
from tests.conftest import rows_read_by

RETENTION = {
    "OMNIVA_ACTIVITY_RETENTION_DAYS": 7,
    "OMNIVA_AUDIT_RETENTION_DAYS": 30,
    "OMNIVA_JOB_RETENTION_DAYS": 7,
    "OMNIVA_EVENT_RETENTION_DAYS": 7,
}


def ago(days: float) -> Any:
    return timezone.now() - timedelta(days=days)


def finished_job(drain: Callable[..., Any], *, days_ago: float) -> Job:
    job = services.job_submit(pipeline="noop")[0]
    drain()
    Job.objects.filter(pk=job.pk).update(finished_at=ago(days_ago))
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    return job


def with_files(job: Job) -> Job:
    folder = services.job_files(job.pk)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out.txt").write_text("x")
    return job


def event(engine_type: str, status: str, *, finished_days_ago: float | None) -> Event:
    kind = engines.event_type_for_engine(engine_type)
    made = engines.event_create(event_type=kind, data={})
    Event.objects.filter(pk=made.pk).update(
        status=status,
        created_at=ago(30),
        finished_at=None if finished_days_ago is None else ago(finished_days_ago),
    )
    return made


def audit(request_id: str, *, days_ago: float) -> None:
    AuditRecord.objects.create(
        request_id=request_id, at=ago(days_ago), method="GET", path="/v1/x", status=200,
        duration_ms=1,
    )  # fmt: skip


def activity(marker: str, *, days_ago: float) -> None:
    omniva.services.activity_record(kind="job:update", data={"marker": marker})
    Activity.objects.filter(data__marker=marker).update(at=ago(days_ago))


def deletes_from(queries: CaptureQueriesContext, table: str) -> int:
    statement = f"DELETE FROM {table} "  # noqa: S608 (a text to look for, not a query)
    return sum(statement in query["sql"] for query in queries.captured_queries)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omniva.services, "PRUNE_BATCH", 2)
    monkeypatch.setattr(services.retention, "JOB_PRUNE_BATCH", 2)


# --- the schedule -----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_retention_schedule_exists_after_migrate_and_names_the_retention_task() -> None:
    schedule = QSchedule.objects.get(name=services.RETENTION_SCHEDULE)
    assert schedule.func == services.RETENTION_TASK
    assert pydoc.locate(schedule.func) is tasks.retention_run
    assert (schedule.schedule_type, schedule.minutes) == (QSchedule.MINUTES, 10)
    assert schedule.repeats == -1  # forever
    assert schedule.cluster is None  # the default cluster, whose guard fires schedules
    assert schedule.next_run is not None


def _the_migrations_schedule() -> QSchedule:
    """The schedule as the migration made it: a transactional test before this one
    flushed every table, the migration's rows with them."""
    from importlib import import_module

    from django.apps import apps

    import_module("jobs.migrations.0003_retention_schedule").create(apps, None)
    return QSchedule.objects.get(name=services.RETENTION_SCHEDULE)


# django-q2's scheduler closes the connection it finds: this runs outside a test transaction.
@pytest.mark.django_db(transaction=True)
@override_settings(**RETENTION)
def test_the_due_schedule_is_fired_by_the_scheduler_and_its_task_runs_a_pass(
    drain: Callable[..., Any],
) -> None:
    schedule = _the_migrations_schedule()
    activity("old", days_ago=8)
    activity("young", days_ago=0)
    old_event = event("renderer", EventStatus.COMPLETED, finished_days_ago=8)
    QSchedule.objects.filter(pk=schedule.pk).update(next_run=ago(1 / 86400))

    scheduler(broker=get_broker())  # what the default qcluster's guard does every 30 s
    assert drain("default").ran  # the retention task, run as a worker runs it

    markers = set(Activity.objects.values_list("data__marker", flat=True))
    assert "old" not in markers
    assert "young" in markers
    assert not Event.objects.filter(pk=old_event.pk).exists()
    schedule.refresh_from_db()
    assert schedule.next_run > timezone.now()  # ten minutes on


# --- a pass ---------------------------------------------------------------------------------


@pytest.mark.django_db
@override_settings(**RETENTION)
def test_a_retention_pass_deletes_what_is_past_retention_in_batches_and_keeps_the_rest(
    drain: Callable[..., Any],
    small_batches: None,
    django_capture_on_commit_callbacks: Any,
) -> None:
    for n in range(5):
        activity(f"old-{n}", days_ago=8)
    activity("young", days_ago=6)
    for n in range(3):
        audit(f"old-{n}", days_ago=31)
    audit("young", days_ago=29)
    old_events = [
        event("renderer", EventStatus.COMPLETED, finished_days_ago=8),
        event("renderer", EventStatus.COMPLETED, finished_days_ago=9),
        event("renderer", EventStatus.COMPLETED, finished_days_ago=10),
        event("renderer", EventStatus.DEAD_LETTERED, finished_days_ago=8),
        event("upscaler", EventStatus.COMPLETED, finished_days_ago=8),
    ]
    kept_events = [
        event("renderer", EventStatus.COMPLETED, finished_days_ago=6),
        event("upscaler", EventStatus.DEAD_LETTERED, finished_days_ago=1),
        event("upscaler", EventStatus.PENDING, finished_days_ago=None),  # made 30 days ago
    ]
    old_jobs = [with_files(finished_job(drain, days_ago=8 + n)) for n in range(3)]
    batch, _ = services.job_submit_batch(items=[{"pipeline": "noop"}, {"pipeline": "noop"}])
    drain()
    Job.objects.filter(pk=batch.pk).update(finished_at=ago(8))
    children = list(batch.children.all())
    with_files(children[0])
    young = with_files(finished_job(drain, days_ago=6))
    active = services.job_submit(pipeline="noop")[0]
    Job.objects.filter(pk=active.pk).update(created_at=ago(30))
    # A queue row its stage left behind (a cancel's race): it goes with the job.
    leftover_task = broker.enqueue_payload(
        queue="default", payload="{}", stage_run_id=old_jobs[0].stages.get().pk
    )
    doomed_jobs = [*old_jobs, batch, *children]

    out_of_time = services.retention_run(budget_s=0)
    assert out_of_time == {
        "timed_out": 0, "dead_lettered": 0, "activity": 0, "audit_records": 0, "events": 0,
        "jobs": 0,
    }  # fmt: skip

    with (
        CaptureQueriesContext(connection) as queries,
        django_capture_on_commit_callbacks(execute=True),
    ):
        pruned = services.retention_run()

    assert pruned == {
        "timed_out": 0, "dead_lettered": 0, "activity": 5, "audit_records": 3, "events": 5,
        "jobs": 6,
    }  # fmt: skip
    # Two rows a batch: 2 + 2 + 1 activity rows, 2 + 1 audit records, and the jobs
    # two top-level ones (with their children) a batch.
    assert deletes_from(queries, "omniva_activity") == 3
    assert deletes_from(queries, "omniva_auditrecord") == 2
    assert deletes_from(queries, "jobs_job") == 2
    markers = set(Activity.objects.values_list("data__marker", flat=True))
    assert not {m for m in markers if m and m.startswith("old-")}
    assert "young" in markers
    assert list(AuditRecord.objects.values_list("request_id", flat=True)) == ["young"]
    assert not Event.objects.filter(pk__in=[e.pk for e in old_events]).exists()
    assert Event.objects.filter(pk__in=[e.pk for e in kept_events]).count() == 3
    doomed = [job.pk for job in doomed_jobs]
    assert not Job.objects.filter(pk__in=doomed).exists()
    assert not StageRun.objects.filter(job_id__in=doomed).exists()
    assert not JobLog.objects.filter(job_id__in=doomed).exists()
    assert not QueueTask.objects.filter(pk=leftover_task).exists()
    assert not any(services.job_files(pk).exists() for pk in doomed)
    assert set(Job.objects.values_list("pk", flat=True)) == {young.pk, active.pk}
    assert services.job_files(young.pk).exists()


@pytest.mark.django_db
@override_settings(**RETENTION)
def test_manage_py_cleanup_runs_the_same_pass_and_says_what_it_pruned(
    drain: Callable[..., Any],
) -> None:
    from io import StringIO

    old_job = finished_job(drain, days_ago=8)
    old_event = event("renderer", EventStatus.DEAD_LETTERED, finished_days_ago=8)
    out = StringIO()

    call_command("cleanup", stdout=out)

    assert out.getvalue().splitlines() == [
        "Cleared 1 job finished over 604800 s ago.",
        "Pruned 0 audit records older than 30 days.",
        "Pruned 0 activity rows older than 7 days.",
        "Pruned 1 finished events older than 7 days.",
        "Took 0 events past their deadline out of the queue (their jobs timed out).",
        "Moved 0 events whose last lease ran out to the dead letter queue.",
    ]
    assert not Job.objects.filter(pk=old_job.pk).exists()
    assert not Event.objects.filter(pk=old_event.pk).exists()


class Holder:
    """Holds a job's row lock from another connection until let go."""

    def __init__(self) -> None:
        self.locked, self.released = threading.Event(), threading.Event()
        self.thread: threading.Thread | None = None

    def hold(self, job_id: Any) -> None:
        def run() -> None:
            try:
                with transaction.atomic():
                    Job.objects.select_for_update().get(pk=job_id)
                    self.locked.set()
                    self.released.wait(timeout=30)
            finally:
                connection.close()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.locked.wait(timeout=10)

    def let_go(self) -> None:
        self.released.set()
        if self.thread is not None:
            self.thread.join(timeout=10)


@pytest.fixture
def holder() -> Iterator[Holder]:
    held = Holder()
    yield held
    held.let_go()


@pytest.mark.django_db(transaction=True)
def test_a_pass_leaves_a_batch_whose_child_someone_holds_and_the_next_pass_takes_it(
    drain: Callable[..., Any], holder: Holder
) -> None:
    batch, _ = services.job_submit_batch(items=[{"pipeline": "noop"}, {"pipeline": "noop"}])
    drain()
    Job.objects.filter(pk=batch.pk).update(finished_at=ago(8))
    alone = finished_job(drain, days_ago=8)
    child = batch.children.order_by("created_at", "id").first()
    assert child is not None
    holder.hold(child.pk)  # say, a retry of the child, which would reopen its batch

    # The pass neither waits for the lock nor deadlocks with the child's transaction
    # (which locks the batch after the child): the family waits for a later pass.
    assert services.jobs_prune(before=ago(1)) == 1
    assert not Job.objects.filter(pk=alone.pk).exists()
    assert Job.objects.filter(pk=batch.pk).exists()
    assert Job.objects.filter(parent=batch).count() == 2

    holder.let_go()
    assert services.jobs_prune(before=ago(1)) == 3
    assert not Job.objects.filter(pk=batch.pk).exists()


# --- what the live feed reads every 5 s ---------------------------------------------------

BIG_TABLES = {"jobs_job", "engines_event", "omniva_activity", "omniva_auditrecord"}


@pytest.mark.django_db
@override_settings(OMNIVA_HEALTH_CACHE_MS=0)
def test_the_live_feeds_figures_and_the_health_checks_read_a_bounded_number_of_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(omniva.selectors, "EXACT_COUNT_LIMIT", 10, raising=False)
    monkeypatch.setattr(jobs.selectors, "AVERAGE_OVER_JOBS", 10, raising=False)
    many = 300
    started, finished = ago(1), ago(1) + timedelta(seconds=1)
    Job.objects.bulk_create(
        Job(pipeline="noop", status=JobStatus.COMPLETED, started_at=started, finished_at=finished)
        for _ in range(many)
    )
    Job.objects.bulk_create(Job(pipeline="noop", status=JobStatus.PENDING) for _ in range(5))
    kind = engines.event_type_for_engine("renderer")
    Event.objects.bulk_create(
        Event(event_type=kind, engine_type="renderer", status=status, finished_at=finished)
        for status, finished, n in (
            (EventStatus.COMPLETED, finished, many),
            (EventStatus.PENDING, None, 5),
        )
        for _ in range(n)
    )
    Activity.objects.bulk_create(Activity(kind="job:update", data={}) for _ in range(many))
    an_hour_ago = ago(1 / 24)
    AuditRecord.objects.bulk_create(
        AuditRecord(
            request_id=str(n), at=an_hour_ago, method="GET", path="/", status=200, duration_ms=1
        )
        for n in range(many)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE jobs_job, engines_event, omniva_activity, omniva_auditrecord")

    with CaptureQueriesContext(connection) as queries:
        figures = omniva.selectors.service_metrics()
        report = health.health_report()

    # Exact below the limit, estimated (at least the limit) above it.
    assert figures["jobs"]["pending"] == 5
    assert figures["jobs"]["completed"] > 10
    assert figures["events"]["pending"] == 5
    assert figures["events"]["completed"] > 10
    assert figures["jobs"]["average_job_time_ms"] == 1000
    assert report["checks"]["engines"]["status"] == "degraded"  # pending, no engine online
    reads = rows_read_by(queries.captured_queries, BIG_TABLES)
    assert reads
    too_many = [read for read in reads if read[1] > 20]
    assert not too_many, too_many
