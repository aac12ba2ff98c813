"""The ends of attempts, written many per transaction (River's batch completer).

A worker process of a cluster does not write an attempt's end (its output, or the
exception it ended with) itself: it hands it to its completer thread and takes its next
task. The completer writes what it was handed once the oldest end has waited
`OMNIVA_COMPLETER_TICK_MS`, or sooner when `OMNIVA_COMPLETER_MAX_BATCH` are waiting
(`write_ends`) in one transaction: the completions of one-stage jobs in one statement
(fastpath.stages_complete_sole) and those of stages of many-stage pipelines in three
(dag_completion.stages_complete_dag), so its commit and the statements' overhead are
paid once per batch, not once per job. Every other end (a failure and its retry, a
completion those refuse) goes through its own transition in a transaction of its own:
in one transaction for the batch, the row locks of a DAG's job were held across the
whole batch, and the other workers' completions and claims of the same job's stages
queued behind them (fan_out_fan_in drained at a third of its rate, docs/benchmarks.md).

What holds, item by item:

- Fencing: every end carries its attempt's token; an end whose lease was lost (another
  attempt holds the stage, or the job ended) is refused alone, the others are written.
- One end that the database refuses (a value it cannot store) or that fails is written
  alone: the statement of a batch that fails is undone whole, and each of its ends then
  goes through its own transition.
- A job shows `completed` (and its next stages queue) only once the transaction holding
  its end committed. Until then the attempt keeps its lease and its queue row, so when the
  worker process dies with ends unwritten (SIGKILL, its host lost) those attempts are
  delivered again after their lease and run again: at least once, never lost, and the
  late end of the first run is refused by its token.
- A worker leaving on its own (the cluster stops, django-q2 recycles it) writes what it
  holds first: `multiprocessing.util.Finalize` runs at the exit of a worker process
  after its task loop returns.

Outside a cluster's worker (tests, `jobs/testing.py`, a batch of the gpu worker run by
hand) `finish` writes at once, as does a tick of 0.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import util as mp_util
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from jobs import services
from jobs.pipelines import registry as pipelines
from jobs.services import StageClaim

logger = logging.getLogger("omniva.jobs.worker")

# An attempt's end: the attempt and its output, or the exception it ended with.
End = tuple[StageClaim, Any]
# How one end that is not a one-stage completion is written (worker._settle).
Settle = Callable[[StageClaim, Any], None]

# How long a leaving worker waits for its last batch to be written.
CLOSE_TIMEOUT_S = 30.0


def storable(outcome: Any) -> bool:
    """An output that JSON can hold (not an exception): one the one-statement completion
    takes; the others go through their transition and fail alone."""
    if isinstance(outcome, BaseException):
        return False
    try:
        json.dumps(outcome, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def write_ends(ends: Sequence[End], settle: Settle) -> None:
    """Write `ends` (see the module): the one-stage completions in one transaction,
    each other end in a transaction of its own. Whatever fails is logged: those attempts
    run again after their lease."""
    sole_pipelines = set(pipelines.single_stage_pipelines())
    sole: list[services.Completion] = []
    dag: list[services.Completion] = []
    for claim, outcome in ends:
        if storable(outcome):
            completion = services.Completion(claim.stage_run_id, claim.token, outcome)
            (sole if claim.pipeline in sole_pipelines else dag).append(completion)
    done: set[int] = set()
    if sole or dag:
        try:
            with transaction.atomic():
                # Each locks its jobs in id order; the two sets of jobs are apart.
                done = services.stages_complete_sole(sole) | services.stages_complete_dag(dag)
        except Exception as exc:
            # The database refused one (a value it cannot store), or the DAG of one could
            # not be read (a pipeline changed under its jobs): the batch is undone whole,
            # and each end goes through its own transition, where only that one fails.
            logger.warning("a batch's completions failed together (%r); one by one", exc)
            _drop_if_broken()
    for claim, outcome in ends:
        if claim.stage_run_id in done:
            continue
        try:
            with transaction.atomic():
                settle(claim, outcome)
        except Exception as exc:
            # Its lease runs out and it is delivered again; the others are written.
            logger.warning("settling %s of job %s failed: %r", claim.stage, claim.job_id, exc)
            _drop_if_broken()


def _drop_if_broken() -> None:
    """After a failed statement: a connection that is gone (a database restart) is
    closed, so the next write connects anew. Not inside a caller's transaction."""
    if not connection.in_atomic_block:
        connection.close_if_unusable_or_obsolete()


class Completer(threading.Thread):
    """One per worker process of a cluster (see the module)."""

    def __init__(self, settle: Settle, *, tick_s: float, max_batch: int) -> None:
        super().__init__(name="completer", daemon=True)
        self.settle = settle
        self.tick_s = tick_s
        self.max_batch = max_batch
        self.changed = threading.Condition()
        self.waiting: list[End] = []
        self.first_at = 0.0
        self.writing = False
        self.closing = False

    def submit(self, ends: Sequence[End]) -> None:
        with self.changed:
            if not self.waiting:
                self.first_at = time.monotonic()
            self.waiting.extend(ends)
            self.changed.notify()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Write what waits, then stop."""
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.join(timeout_s)

    def run(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.waiting or self.closing)
                if not self.waiting:
                    break  # closing, and everything is written
                due = self.first_at + self.tick_s
                self.changed.wait_for(
                    lambda: len(self.waiting) >= self.max_batch or self.closing,
                    max(0.0, due - time.monotonic()),
                )
                batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch :]
                self.first_at = time.monotonic()
                self.writing = True
            try:
                write_ends(batch, self.settle)
            except Exception:
                # Not the database (write_ends logs that): a fault of ours must not end
                # the thread. Those attempts run again after their lease.
                logger.exception("writing %d attempt ends failed", len(batch))
            finally:
                with self.changed:
                    self.writing = False
                    self.changed.notify_all()
        connection.close()


_completer: Completer | None = None
_completer_lock = threading.Lock()
# Set in a cluster's worker processes (jobs/apps.py, django-q2's post_spawn).
_in_cluster_worker = False


def in_cluster_worker() -> None:
    """This process is a worker of a cluster: ends go through its completer."""
    global _in_cluster_worker
    _in_cluster_worker = True


def _the_completer(settle: Settle) -> Completer:
    global _completer
    with _completer_lock:
        # A forked worker inherits the variable, not the thread.
        if _completer is None or not _completer.is_alive():
            _completer = Completer(
                settle,
                tick_s=settings.OMNIVA_COMPLETER_TICK_MS / 1000,
                max_batch=settings.OMNIVA_COMPLETER_MAX_BATCH,
            )
            _completer.start()
            mp_util.Finalize(None, _completer.close, exitpriority=100)
        return _completer


def finish(ends: Sequence[End], settle: Settle) -> None:
    """Hand `ends` to this worker's completer, or write them at once outside a cluster's
    worker (or with a tick of 0)."""
    if _in_cluster_worker and settings.OMNIVA_COMPLETER_TICK_MS > 0:
        _the_completer(settle).submit(ends)
    else:
        write_ends(ends, settle)


def flush(timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Write what this process's completer holds before the process ends on purpose
    (the supervisor ending a worker whose stage ignored its stop)."""
    if _completer is not None and _completer.is_alive():
        _completer.close(timeout_s)
