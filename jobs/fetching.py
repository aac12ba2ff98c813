"""What a cluster's pusher hands its workers (fetch by demand): a task for each worker
waiting for one, and a few claimed ahead of them while tasks are short, kept in the
pusher's Stash. PostgresBroker.dequeue (jobs/broker.py) claims by this plan.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from django_q.cluster import get_mp_context
from django_q.conf import Conf
from django_q.worker import rss_check


class ClaimedTask(NamedTuple):
    ack_id: str
    payload: str
    priority: int


# How many tasks the pusher keeps claimed ahead of the workers: as many as they finish in
# this long at the task time seen so far (none for stages of seconds; up to
# `queue_limit` for no-ops).
AHEAD_BUDGET_S = 0.02
# Weight of the latest task in the cluster's running mean of task time.
TASK_TIME_WEIGHT = 0.2
# The mean is used for fetching ahead only while a task ended this recently.
TASK_TIME_FRESH_S = 1.0


@dataclass(frozen=True)
class ClaimPlan:
    """What the pusher hands out next: a task for each waiting worker that no task in
    django-q2's queue serves (`demand`), the tasks that keep that queue at its share of
    the allowance (`top_up`), and how many tasks may be claimed ahead (`allowance`)."""

    demand: int
    top_up: int
    allowance: int

    @property
    def count(self) -> int:
        return self.demand + self.top_up


class ReadyWorkers:
    """Fetch by demand: how many workers of this cluster wait for a task (a semaphore
    the workers release once when spawned, then after each task, and the pusher takes
    before it claims) and how long a task takes (a running mean the workers keep).

    Made when jobs.fetching is first imported (by jobs.broker), in the qcluster process,
    so the sentinel, its pusher and its workers (all forked from it) share it. The count
    stays right as workers come and go: one that dies in a task took its permit with it
    and its replacement brings one; one that is recycled brings none back from its last task.
    Only a pusher killed between its plan and its claim's end loses permits.

    The pusher gives one task to each waiting worker, and keeps tasks claimed ahead when
    tasks are short (AHEAD_BUDGET_S of them): a no-op's claim round trip would otherwise
    idle a worker as long as the task itself. Of those, up to one per worker wait in
    django-q2's queue (`_queued` counts them; only the pusher touches it), where a
    worker takes its next task without waiting for the pusher; the rest wait in the
    broker's Stash, where a task that outranks them goes first.
    """

    def __init__(self) -> None:
        context = get_mp_context()
        self._waiting = context.Semaphore(0)
        self._task_s = context.Value("d", 0.0)
        # When a task last ended (time.monotonic, one clock for every process).
        self._task_ended = context.Value("d", 0.0, lock=False)
        self._tasks_run = 0  # by this worker process
        self._task_started = 0.0  # by this worker process
        self._queued = 0  # by this (the pusher) process

    # --- in a worker --------------------------------------------------------------------

    def spawned(self) -> None:
        self._waiting.release()

    def task_started(self) -> None:
        self._task_started = time.monotonic()

    def task_done(self) -> None:
        took = time.monotonic() - self._task_started
        with self._task_s.get_lock():
            mean = self._task_s.value
            self._task_s.value = took if mean <= 0 else mean + TASK_TIME_WEIGHT * (took - mean)
            self._task_ended.value = time.monotonic()
        self._tasks_run += 1
        # django-q2 ends a worker after RECYCLE tasks or past its memory cap, right after
        # this signal; such a worker waits for nothing, and its replacement announces itself.
        if self._tasks_run == Conf.RECYCLE or rss_check():
            return
        self._waiting.release()

    # --- in the pusher ------------------------------------------------------------------

    def plan(self, *, most: int, wait_s: float) -> ClaimPlan | None:
        """Wait up to `wait_s` for a waiting worker; None if none came."""
        if not self._waiting.acquire(timeout=wait_s):
            return None
        waiting = 1
        while waiting < most and self._waiting.acquire(block=False):
            waiting += 1
        served = min(waiting, self._queued)  # they take tasks waiting in django-q2's queue
        self._queued -= served
        allowance = self._allowance()
        top_up = max(0, min(int(Conf.WORKERS), allowance) - self._queued)
        return ClaimPlan(demand=waiting - served, top_up=top_up, allowance=allowance)

    def handed(self, plan: ClaimPlan, count: int) -> None:
        """`count` tasks were handed out for `plan`: those beyond the demand wait in the
        queue; the waiting workers left without one are waiting still."""
        self._queued += max(0, count - plan.demand)
        for _ in range(max(0, plan.demand - count)):
            self._waiting.release()

    def _allowance(self) -> int:
        mean = self._task_s.value
        # A mean from before the workers went idle says nothing of the tasks that come
        # next: a backlog of 1 s stages enqueued after no-ops would otherwise be fetched
        # ahead by the dozen, and an urgent task behind them wait seconds.
        if mean <= 0 or time.monotonic() - self._task_ended.value > TASK_TIME_FRESH_S:
            return 0
        return min(int(Conf.QUEUE_LIMIT or 0), int(AHEAD_BUDGET_S * int(Conf.WORKERS) / mean))


READY_WORKERS = ReadyWorkers()


def worker_spawned(sender: Any, proc_name: str, **kwargs: Any) -> None:
    """django-q2's post_spawn, in the new worker process."""
    READY_WORKERS.spawned()


def worker_task_started(sender: Any, func: Any, task: dict[str, Any], **kwargs: Any) -> None:
    """django-q2's pre_execute, in the worker."""
    READY_WORKERS.task_started()


def worker_task_done(sender: Any, task: dict[str, Any], **kwargs: Any) -> None:
    """django-q2's post_execute_in_worker: the worker is about to wait for its next task."""
    if not task.get("sync"):
        READY_WORKERS.task_done()


class Stash:
    """The tasks a pusher claimed ahead of its workers, handed out highest priority
    first (then oldest). Claimed tasks are leased and their stages started: the stash
    only ever holds AHEAD_BUDGET_S of work at the task time seen when they were claimed,
    and a task that outranks them is claimed and handed out first (PostgresBroker.dequeue).
    A pusher that stops puts them back as it exits (PostgresBroker.stash_give_back);
    should it die with tasks in it, they are delivered again after their lease, like any
    task a dead cluster held."""

    def __init__(self) -> None:
        self._tasks: list[tuple[int, int, ClaimedTask]] = []
        self._added = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, tasks: list[ClaimedTask]) -> None:
        for task in tasks:
            self._added += 1
            heapq.heappush(self._tasks, (-task.priority, self._added, task))

    def take(self, count: int) -> list[tuple[str, str]]:
        taken: list[tuple[str, str]] = []
        while self._tasks and len(taken) < count:
            task = heapq.heappop(self._tasks)[2]
            taken.append((task.ack_id, task.payload))
        return taken

    def top_priority(self) -> int:
        return -self._tasks[0][0] if self._tasks else -(2**31)
