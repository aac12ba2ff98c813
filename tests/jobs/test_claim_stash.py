"""The tasks a pusher keeps claimed ahead of its workers (jobs.fetching.Stash): refilled
many per claim once half are gone, never in the way of a task that outranks them, and
put back when the pusher stops.
The broker runs here as in a pusher, on its own connection, so rows are committed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import transaction
from django.utils import timezone
from django_q.conf import Conf

from jobs import fetching, services
from jobs.broker import PostgresBroker, enqueue_payload
from jobs.fetching import AHEAD_BUDGET_S, ReadyWorkers
from jobs.models import Job, JobStatus, QueueTask, StageRun, StageStatus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def ready(monkeypatch: pytest.MonkeyPatch) -> ReadyWorkers:
    """The cluster's workers, having run short tasks (so tasks are claimed ahead)."""
    ready = ReadyWorkers()
    for _ in range(2):
        ready.task_started()
        ready._task_started -= AHEAD_BUDGET_S / 100
        ready.task_done()  # a worker finished and waits for its next task
    monkeypatch.setattr(fetching, "READY_WORKERS", ready)
    return ready


@pytest.fixture
def broker() -> Iterator[PostgresBroker]:
    broker = PostgresBroker(list_key="default")
    yield broker
    if broker._conn is not None:
        broker._conn.close()


def _enqueue(payloads: list[str], *, priority: int) -> None:
    with transaction.atomic():
        for payload in payloads:
            enqueue_payload(queue="default", payload=payload, priority=priority)


def _claimed() -> int:
    return QueueTask.objects.filter(deliveries__gt=0).count()


def _worker_done(ready: ReadyWorkers) -> None:
    ready.task_started()
    ready._task_started -= AHEAD_BUDGET_S / 100
    ready.task_done()


def test_tasks_claimed_ahead_serve_the_workers_until_half_are_gone_then_refill_at_once(
    ready: ReadyWorkers, broker: PostgresBroker
) -> None:
    allowance, workers = int(Conf.QUEUE_LIMIT), int(Conf.WORKERS)
    _enqueue([f"task {n}" for n in range(4 * allowance)], priority=2)

    first = broker.dequeue()

    # Both waiting workers got one, and one per worker waits in django-q2's queue; the
    # allowance waits in the stash.
    assert first is not None
    assert len(first) == 2 + workers
    assert _claimed() == 2 + workers + allowance
    handed = []
    for _ in range(allowance // 2):
        _worker_done(ready)
        handed += broker.dequeue() or []
    # Handed out from the stash, without a claim, down to half of it ...
    assert len(handed) == allowance // 2
    assert _claimed() == 2 + workers + allowance
    _worker_done(ready)
    handed += broker.dequeue() or []
    # ... then one claim topped it up again: half an allowance, and the task handed out.
    assert _claimed() == 2 + workers + allowance + allowance // 2 + 1
    payloads = [payload for _, payload in first + handed]
    assert payloads == [f"task {n}" for n in range(len(payloads))]  # in order, none twice


def test_a_task_that_outranks_the_tasks_claimed_ahead_is_handed_out_first(
    ready: ReadyWorkers, broker: PostgresBroker
) -> None:
    _enqueue([f"low {n}" for n in range(3 * int(Conf.QUEUE_LIMIT))], priority=2)
    assert broker.dequeue() is not None  # the workers busy, tasks claimed ahead
    _enqueue(["urgent"], priority=10)

    _worker_done(ready)
    handed = broker.dequeue()

    assert handed is not None
    assert [payload for _, payload in handed] == ["urgent"]


def test_a_stopping_pusher_puts_its_stash_back_ready_and_uncounted(
    ready: ReadyWorkers, broker: PostgresBroker
) -> None:
    allowance = int(Conf.QUEUE_LIMIT)
    jobs = [services.job_submit(pipeline="noop", max_retries=0)[0] for _ in range(2 * allowance)]
    handed = broker.dequeue() or []
    stashed = len(broker._stash)
    assert stashed == allowance
    assert StageRun.objects.filter(status=StageStatus.RUNNING).count() == len(handed) + stashed

    broker.stash_give_back()

    # What was handed out keeps its start; each stashed one is queued again, its
    # attempt given back, with one fresh row ready now.
    assert StageRun.objects.filter(status=StageStatus.RUNNING).count() == len(handed)
    queued = StageRun.objects.filter(status=StageStatus.QUEUED, job__in=jobs)
    assert queued.count() == 2 * allowance - len(handed)
    assert set(queued.values_list("attempt", flat=True)) == {0}
    ready_rows = QueueTask.objects.filter(visible_at__lte=timezone.now(), deliveries=0)
    assert ready_rows.count() == 2 * allowance - len(handed)
    assert not Job.objects.filter(status=JobStatus.FAILED).exists()
