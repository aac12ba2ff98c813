"""The pusher's claim plan (jobs.broker.ReadyWorkers): one task per waiting worker, and
tasks fetched ahead only while tasks are short enough that they hold nothing back."""

from __future__ import annotations

import pytest
from django_q.conf import Conf

from jobs.broker import AHEAD_BUDGET_S, ReadyWorkers


def _ran(ready: ReadyWorkers, *, seconds: float, tasks: int = 1) -> None:
    """`tasks` tasks of `seconds` each, done by the worker side of `ready`."""
    for _ in range(tasks):
        ready.task_started()
        ready._task_started -= seconds  # as if it started `seconds` ago
        ready.task_done()


def test_the_pusher_waits_for_a_worker_and_claims_one_task_for_each_waiting_one() -> None:
    ready = ReadyWorkers()
    assert ready.plan(most=4, wait_s=0) is None  # no worker waits: nothing is claimed
    ready.spawned()
    ready.spawned()
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    assert (plan.demand, plan.ahead) == (2, 0)  # no task time known yet: none ahead


def test_a_waiting_worker_left_without_a_task_is_waiting_still() -> None:
    ready = ReadyWorkers()
    ready.spawned()
    ready.spawned()
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    ready.claimed(plan, 1)  # only one task was ready
    again = ready.plan(most=4, wait_s=0)
    assert again is not None
    assert again.demand == 1


def test_no_task_is_fetched_ahead_of_stages_that_take_seconds() -> None:
    ready = ReadyWorkers()
    _ran(ready, seconds=1.0, tasks=3)  # three workers finished a 1 s stage
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    assert (plan.demand, plan.ahead) == (3, 0)


def test_short_tasks_are_fetched_ahead_and_a_worker_they_serve_needs_no_claim() -> None:
    ready = ReadyWorkers()
    seconds = AHEAD_BUDGET_S / 100
    _ran(ready, seconds=seconds, tasks=2)
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    assert plan.demand == 2
    assert plan.ahead == Conf.QUEUE_LIMIT  # capped where django-q2's buffer is
    ready.claimed(plan, plan.limit)
    _ran(ready, seconds=seconds)  # a worker finished: a task fetched ahead awaits it
    topped_up = ready.plan(most=4, wait_s=0)
    assert topped_up is not None
    assert (topped_up.demand, topped_up.ahead) == (0, 1)


@pytest.mark.parametrize("seconds", [0.05, 0.5, 5.0])
def test_what_is_fetched_ahead_finishes_within_the_budget(seconds: float) -> None:
    ready = ReadyWorkers()
    _ran(ready, seconds=seconds, tasks=20)
    plan = ready.plan(most=1, wait_s=0)
    assert plan is not None
    assert plan.ahead * seconds / int(Conf.WORKERS) <= AHEAD_BUDGET_S
