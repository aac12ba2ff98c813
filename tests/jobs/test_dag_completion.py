"""Stages of many-stage pipelines complete many per transaction in three statements
(jobs/services/dag_completion.py): what follows each completion (its children queued,
the job's progress, the job's result) is what stage_complete decides one at a time, a
sibling committed while the batch waited for its job's lock is seen, and what it
refuses is left for the full rules."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django_q.signing import SignedPackage

from engines.models import Event
from jobs import completer, services, worker
from jobs.models import Job, JobStatus, QueueTask, StageRun, StageStatus
from jobs.pipelines.builtin import fan_result
from jobs.pipelines.registry import _REGISTRY, Pipeline, Stage, register
from jobs.services import activity
from omniva.models import Activity
from tests.conftest import wait_for
from tests.jobs.conftest import claim_one
from tests.jobs.test_activity import as_stored
from tests.jobs.test_job_done_notify import job_done_notifies

pytestmark = pytest.mark.django_db(transaction=True)


def start_ready(queue: str = "default") -> dict[str, services.StageClaim]:
    """Every ready stage of `queue` started as a worker starts it, by stage run id."""
    claims = {}
    while (claimed := claim_one(queue)) is not None:
        ack_id, task = claimed
        claim = services.stage_start(stage_run_id=task["args"][0], worker="w:1", ack_id=ack_id)
        assert claim is not None
        claims[claim.stage_run_id] = claim
    return claims


def ends(claims: Any, output: Any = None) -> list[completer.End]:
    return [(claim, {"stage": claim.stage} if output is None else output) for claim in claims]


def run_of(job: Job, name: str) -> StageRun:
    return StageRun.objects.get(job=job, name=name)


def fan_out_job(width: int = 2, **kwargs: Any) -> Job:
    return services.job_submit(pipeline="fan_out_fan_in", params={"width": width}, **kwargs)[0]


def test_a_batch_of_dag_completions_is_written_in_three_statements() -> None:
    jobs = [fan_out_job() for _ in range(3)]
    roots = start_ready()
    assert len(roots) == 3

    with CaptureQueriesContext(connection) as queries:
        completer.write_ends(ends(roots.values()), worker._settle)

    statements = [query["sql"] for query in queries.captured_queries]
    assert statements[0] == "BEGIN", statements
    assert statements[-1] == "COMMIT", statements
    assert len(statements) == 5, "three statements for the whole batch"
    for job in jobs:
        job.refresh_from_db()
        assert run_of(job, "split").status == StageStatus.COMPLETED
        parts = [run_of(job, f"part_{i}") for i in range(2)]
        assert [part.status for part in parts] == [StageStatus.QUEUED] * 2
        tasks = QueueTask.objects.filter(stage_run_id__in=[part.pk for part in parts])
        assert sorted(SignedPackage.loads(task.payload)["args"][0] for task in tasks) == sorted(
            part.pk for part in parts
        ), "one signed task per child, naming its run"
        assert run_of(job, "join").status == StageStatus.WAITING
        assert job.progress == 25.0, "one of four stages done"
        assert job.status == JobStatus.RUNNING


def test_what_it_writes_is_what_the_python_transitions_write() -> None:
    job = fan_out_job()
    [root] = start_ready().values()

    completer.write_ends(ends([root]), worker._settle)

    job.refresh_from_db()
    rows = list(Activity.objects.filter(job_id=job.pk).order_by("-id")[:4])[::-1]
    assert [row.kind for row in rows] == [
        "stage:update",
        "stage:update",
        "stage:update",
        "job:progress",
    ]
    done, *queued, progressed = rows
    assert done.data == as_stored(activity._stage_summary(run_of(job, "split")))
    assert [row.data for row in queued] == [
        as_stored(activity._stage_summary(run_of(job, f"part_{i}"))) for i in range(2)
    ]
    assert progressed.data == as_stored(activity._job_summary(job))
    assert all(row.project_id == job.project_id for row in rows)


def test_siblings_completed_in_one_batch_queue_their_join_once() -> None:
    job = fan_out_job()
    completer.write_ends(ends(start_ready().values()), worker._settle)
    parts = start_ready()
    assert len(parts) == 2

    completer.write_ends(ends(parts.values()), worker._settle)

    join = run_of(job, "join")
    assert join.status == StageStatus.QUEUED
    assert QueueTask.objects.filter(stage_run_id=join.pk).count() == 1


def test_a_sibling_committed_while_the_batch_waited_for_its_lock_is_seen() -> None:
    """Two workers complete the two parts of one job at once: the second waits for the
    job's lock held by the first, and must see the first's completion once it has it,
    or neither queues the join."""
    job = fan_out_job()
    completer.write_ends(ends(start_ready().values()), worker._settle)
    first, second = start_ready().values()
    holding, release = threading.Event(), threading.Event()
    done: list[set[int]] = []

    def complete(claim: services.StageClaim, *, hold: bool) -> None:
        try:
            with transaction.atomic():
                done.append(services.stages_complete_dag(
                    [services.Completion(claim.stage_run_id, claim.token, {"part": claim.stage})]
                ))  # fmt: skip
                if hold:
                    holding.set()
                    release.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=complete, args=(first,), kwargs={"hold": True})
    holder.start()
    assert holding.wait(30)
    waiter = threading.Thread(target=complete, args=(second,), kwargs={"hold": False})
    waiter.start()
    wait_for(lambda: waiting_for_a_lock() == 1, timeout=30, what="the second to wait")
    release.set()
    holder.join(30)
    waiter.join(30)

    assert done == [{first.stage_run_id}, {second.stage_run_id}]
    join = run_of(job, "join")
    assert join.status == StageStatus.QUEUED, "the join waits for ever"
    assert QueueTask.objects.filter(stage_run_id=join.pk).count() == 1


def waiting_for_a_lock() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


def test_the_last_stage_completes_the_job_with_its_pipelines_result() -> None:
    jobs: list[Job] = []

    def run_to_the_end() -> None:
        jobs.append(fan_out_job(awaited=True))
        while claims := start_ready():
            completer.write_ends(
                [(claim, {"part": index, "square": index}) for index, claim in
                 enumerate(claims.values())],
                worker._settle,
            )  # fmt: skip

    assert job_done_notifies(run_to_the_end) == [str(jobs[0].pk)]
    job = jobs[0]
    job.refresh_from_db()
    outputs = dict(StageRun.objects.filter(job=job).values_list("name", "output"))
    assert job.status == JobStatus.COMPLETED
    assert job.result == fan_result(outputs, None)  # type: ignore[arg-type]
    assert job.progress == 100.0
    assert job.finished_at is not None
    assert not QueueTask.objects.exists()
    last = Activity.objects.filter(job_id=job.pk).order_by("-id").first()
    assert last is not None
    assert last.kind == "job:update"
    assert last.data == as_stored(activity._job_summary(job))


def test_a_completion_it_refuses_is_left_for_the_full_rules() -> None:
    job = fan_out_job()
    [root] = start_ready().values()
    Job.objects.filter(pk=job.pk).update(cancel_requested_at=job.created_at)
    stale = services.Completion(root.stage_run_id, root.token, {})

    with transaction.atomic():
        assert services.stages_complete_dag([stale]) == set()
    assert run_of(job, "split").status == StageStatus.RUNNING, "nothing changed"

    completer.write_ends(ends([root]), worker._settle)

    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert not QueueTask.objects.exists()


def test_a_stale_token_is_refused_item_by_item() -> None:
    jobs = [fan_out_job() for _ in range(2)]
    fresh, stale = start_ready().values()
    StageRun.objects.filter(pk=stale.stage_run_id).update(lease_token=None)

    with transaction.atomic():
        done = services.stages_complete_dag(
            [services.Completion(claim.stage_run_id, claim.token, {}) for claim in (fresh, stale)]
        )

    assert done == {fresh.stage_run_id}
    assert sorted(run.status for run in StageRun.objects.filter(name="split")) == [
        StageStatus.COMPLETED,
        StageStatus.RUNNING,
    ]
    assert {job.pk for job in jobs} == set(Job.objects.values_list("pk", flat=True))


@pytest.fixture
def worker_then_engine() -> Iterator[Pipeline]:
    pipeline = register(
        Pipeline(
            name="test_worker_then_engine",
            description="a worker stage, then an engine's",
            stages=(
                Stage("first", lambda ctx: {"from": "first"}),
                Stage("echo", engine_type="echo", depends_on=("first",)),
            ),
        )
    )
    yield pipeline
    _REGISTRY.pop(pipeline.name)


def test_an_engine_child_is_queued_as_its_event(worker_then_engine: Pipeline) -> None:
    job, _ = services.job_submit(pipeline=worker_then_engine.name)
    [first] = start_ready().values()

    with transaction.atomic():
        assert services.stages_complete_dag(
            [services.Completion(first.stage_run_id, first.token, {"from": "first"})]
        ) == {first.stage_run_id}

    echo = run_of(job, "echo")
    assert echo.status == StageStatus.QUEUED
    event = Event.objects.get(stage_run_id=echo.pk)
    assert event.data["inputs"] == {"first": {"from": "first"}}


@pytest.fixture
def changing() -> Iterator[str]:
    """A pipeline whose declaration changes under its running jobs (a deploy)."""
    name = "test_changing"
    register(
        Pipeline(
            name=name,
            description="first, then second",
            stages=(Stage("first", lambda ctx: {}), Stage("second", lambda ctx: {}, ("first",))),
        )
    )
    yield name
    _REGISTRY.pop(name)


def test_an_end_whose_dag_cannot_be_read_fails_alone_in_its_batch(changing: str) -> None:
    services.job_submit(pipeline="noop")
    changed, _ = services.job_submit(pipeline=changing)
    claims = list(start_ready().values())
    _REGISTRY[changing] = Pipeline(
        name=changing,
        description="first, then another",
        stages=(Stage("first", lambda ctx: {}), Stage("other", lambda ctx: {}, ("first",))),
    )

    completer.write_ends(ends(claims), worker._settle)

    assert Job.objects.get(pipeline="noop").status == JobStatus.COMPLETED
    assert run_of(changed, "first").status == StageStatus.RUNNING, "left to its lease"
