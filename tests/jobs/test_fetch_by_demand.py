"""The pusher's plan (jobs.fetching.ReadyWorkers): one task per waiting worker, and tasks
claimed ahead only while tasks are short enough that they hold nothing back."""

from __future__ import annotations

import pytest
from django_q.conf import Conf

from jobs.fetching import AHEAD_BUDGET_S, TASK_TIME_FRESH_S, ReadyWorkers


def _ran(ready: ReadyWorkers, *, seconds: float, tasks: int = 1) -> None:
    """`tasks` tasks of `seconds` each, done by the worker side of `ready`."""
    for _ in range(tasks):
        ready.task_started()
        ready._task_started -= seconds  # as if it started `seconds` ago
        ready.task_done()


def test_the_pusher_waits_for_a_worker_and_serves_each_waiting_one() -> None:
    ready = ReadyWorkers()
    assert ready.plan(most=4, wait_s=0) is None  # no worker waits: nothing is claimed
    ready.spawned()
    ready.spawned()
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    assert (plan.demand, plan.top_up, plan.allowance) == (2, 0, 0)  # no task time known yet


def test_a_waiting_worker_left_without_a_task_is_waiting_still() -> None:
    ready = ReadyWorkers()
    ready.spawned()
    ready.spawned()
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    ready.handed(plan, 1)  # only one task was ready
    again = ready.plan(most=4, wait_s=0)
    assert again is not None
    assert again.demand == 1


def test_no_task_is_claimed_ahead_of_stages_that_take_seconds() -> None:
    ready = ReadyWorkers()
    _ran(ready, seconds=1.0, tasks=3)  # three workers finished a 1 s stage
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    assert (plan.demand, plan.top_up, plan.allowance) == (3, 0, 0)


def test_short_tasks_are_claimed_ahead_and_one_per_worker_waits_in_the_queue() -> None:
    ready = ReadyWorkers()
    seconds = AHEAD_BUDGET_S / 100
    _ran(ready, seconds=seconds, tasks=2)
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    assert (plan.demand, plan.top_up, plan.allowance) == (2, Conf.WORKERS, Conf.QUEUE_LIMIT)
    ready.handed(plan, plan.count)
    _ran(ready, seconds=seconds)  # a worker finished: a task in the queue awaits it
    served = ready.plan(most=4, wait_s=0)
    assert served is not None
    assert (served.demand, served.top_up) == (0, 1)


@pytest.mark.parametrize("seconds", [0.05, 0.5, 5.0])
def test_what_is_claimed_ahead_finishes_within_the_budget(seconds: float) -> None:
    ready = ReadyWorkers()
    _ran(ready, seconds=seconds, tasks=20)
    plan = ready.plan(most=1, wait_s=0)
    assert plan is not None
    assert plan.allowance * seconds / int(Conf.WORKERS) <= AHEAD_BUDGET_S


def test_a_task_time_from_before_the_workers_went_idle_claims_nothing_ahead() -> None:
    ready = ReadyWorkers()
    _ran(ready, seconds=AHEAD_BUDGET_S / 100, tasks=2)  # no-ops, then nothing for a while
    ready._task_ended.value -= TASK_TIME_FRESH_S + 1
    plan = ready.plan(most=4, wait_s=0)
    assert plan is not None
    assert (plan.demand, plan.top_up, plan.allowance) == (2, 0, 0)
