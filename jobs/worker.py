"""The worker runtime: how a worker process runs one attempt of a stage (jobs/tasks.py
`run_stage` is its django-q2 entry point).

While the stage function runs, a supervisor thread heartbeats: it extends the attempt's
lease and its queue row's, so a live worker keeps its task and a dead one loses it
after one lease. The supervisor also enforces what the stage code may ignore: past the
job's deadline the main thread gets SIGALRM (StageTimedOut); once a cancel's grace
period is over the job is cancelled in the database (the attempt's token is revoked,
so its result would be refused) and the main thread gets SIGUSR1 (StageCancelled). An
attempt that lost its lease (another worker took the stage over, or its job ended: a
sibling stage failed, a cancel or deadline seen by another process) gets SIGUSR1 too
(StageLeaseLost), so what it would do next (an upload, an API call) does not happen. A
stage stuck in native code that does not return even then takes its worker process
down with it; django-q2 starts a fresh one.

A batchable stage (`Stage.batch`, the gpu queue) runs the attempts gathered with the
delivered one in one call (`_execute_batch`), and each job's outcome stays its own: a
call that raises is split in halves until the attempt whose input makes it raise is
alone; an attempt past its deadline, or cancelled, ends so on its own (the supervisor
ends it in the database while the batch runs); when the delivered attempt stops the
batch, the others are put back in the queue uncounted (`stage_release`); and each is
settled on its own (under a savepoint of its own in the completer's transaction), so
one's database error undoes none of the others'.

Every attempt's end is written by the worker's completer (jobs/completer.py), many
ends per transaction, while the worker runs its next stage.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, DataError, connection, transaction
from django.utils import timezone

from jobs import completer, gpu_worker, services
from jobs.broker import acknowledge_delivery
from jobs.pipelines import registry as pipelines
from jobs.pipelines.context import (
    StageCancelled,
    StageContext,
    StageError,
    StageInterrupted,
    StageLeaseLost,
    StageTimedOut,
)
from jobs.pipelines.lib.inference import GPU_QUEUE
from omniva.errors import FailureCode, OmnivaError

logger = logging.getLogger("omniva.jobs.worker")

# How long the main thread gets, after the signal, to leave a stage that was forced to
# stop before the supervisor ends the worker process.
FORCE_EXIT_AFTER_S = 10.0

# The delivery (ack id) of the task this worker process is executing, set by the
# pre_execute signal of django-q2 (see jobs/apps.py).
_current_delivery: dict[str, Any] = {"ack_id": None, "task": None}


def remember_delivery(sender: Any, func: Any, task: dict[str, Any], **kwargs: Any) -> None:
    _current_delivery["ack_id"] = task.get("ack_id")
    _current_delivery["task"] = task


def _acknowledged(claim: services.StageClaim) -> None:
    """The transition that writes the attempt's end drops its queue rows in its own
    transaction: django-q2's monitor must not acknowledge the delivery (it acknowledges
    only tasks that still carry an ack id), least of all before that commits. Attempts
    gathered into a batch were claimed by the worker itself; django-q2 never knew them."""
    task = _current_delivery.get("task")
    if task is not None and claim.ack_id and task.get("ack_id") == claim.ack_id:
        task.pop("ack_id", None)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Supervisor(threading.Thread):
    """One per worker process, started with its first stage and kept: a thread per
    stage would cost more than a short stage itself. It watches one attempt at a time
    (`watch`/`release`, called by the main thread around the stage function), and the
    attempts batched with it (`riders`): their leases, cancels and deadlines."""

    def __init__(self) -> None:
        super().__init__(name="stage-supervisor", daemon=True)
        self.changed = threading.Condition()
        self.claim: services.StageClaim | None = None
        self.riders: tuple[services.StageClaim, ...] = ()
        self.forced: type[StageInterrupted] | None = None
        self.since = 0.0  # when the watched attempt started, or was last beaten
        self.connected = False  # a heartbeat opened this thread's database connection
        self.wakes_at = 0.0  # when the supervisor's sleep ends, while it sleeps
        # Held while a heartbeat runs: `release` waits for it, so that no heartbeat of an
        # attempt is in flight once the main thread settles it (their row locks, taken
        # in other orders, could deadlock) or releases its batch's other attempts.
        self.beating = threading.Lock()

    @staticmethod
    def interval() -> float:
        lease = float(settings.OMNIVA_TASK_LEASE_S)
        return max(0.1, min(lease / 3, float(settings.OMNIVA_CANCEL_GRACE_S) / 2 or 1))

    def watch(
        self, claim: services.StageClaim, riders: tuple[services.StageClaim, ...] = ()
    ) -> None:
        # No wake-up: the supervisor looks at an attempt one interval after it started.
        # Waking it for every stage (and again at its end) cost more than a no-op stage:
        # two thread switches, and the GIL handed back and forth.
        with self.changed:
            self.claim = claim
            self.riders = riders
            self.forced = None
            self.since = time.monotonic()
            if self.wakes_at > self.since + self.interval():
                self.changed.notify()  # asleep for longer (the interval was changed)

    def release(self) -> None:
        with self.changed:
            self.claim = None
            self.riders = ()
            # The supervisor waits for a forced stop's end, and closes the connection
            # its heartbeats opened.
            if self.forced is not None or self.connected:
                self.changed.notify()
        with self.beating:
            pass

    def run(self) -> None:
        while True:
            interval = self.interval()
            with self.changed:
                claim, riders, forced = self.claim, self.riders, self.forced
                if claim is None:
                    if self.connected:  # a heartbeat's connection is not kept idle
                        connection.close()
                        self.connected = False
                    self._sleep(interval)
                    continue
                due = self.since + interval - time.monotonic()
                if forced is None and due > 0:
                    self._sleep(due)
                    continue
            if forced is None:
                with self.beating:
                    self._beat(claim)
                    # Not once the beat stopped the batch: its other attempts are the
                    # main thread's to put back.
                    if self.forced is None and self.claim is claim:
                        self._beat_riders(riders)
                with self.changed:
                    self.connected = True
                    if self.claim is claim:
                        self.since = time.monotonic()  # the next beat one interval on
                continue
            with self.changed:
                if not self._released(claim, FORCE_EXIT_AFTER_S):
                    logger.error("stage %s ignored its stop; ending the worker", claim.stage)
                    completer.flush()  # the ends of its earlier attempts
                    os._exit(70)

    def _sleep(self, seconds: float) -> None:
        """Wait (holding `changed`) for `seconds`, or until notified."""
        self.wakes_at = time.monotonic() + seconds
        self.changed.wait(seconds)
        self.wakes_at = 0.0

    def _released(self, claim: services.StageClaim | None, timeout: float) -> bool:
        """Wait (holding `changed`) until `claim` is no longer watched, or `timeout`."""
        return self.changed.wait_for(lambda: self.claim is not claim, timeout)

    def _beat(self, claim: services.StageClaim) -> None:
        try:
            state = services.stage_heartbeat(claim=claim, worker=worker_name())
        except DatabaseError as exc:
            logger.warning("heartbeat failed: %s", exc.__class__.__name__)
            connection.close()
            return
        now = timezone.now()
        if not state.lease_held:
            # Another attempt holds the stage, or its job ended: stop it as a cancel
            # does. Its delivery is not acknowledged: a row still there is the new
            # holder's (or dropped with the job already).
            self._interrupt(claim, StageLeaseLost, signal.SIGUSR1, acknowledge=False)
            return
        if state.cancel_requested_at and now - state.cancel_requested_at >= timedelta(
            seconds=settings.OMNIVA_CANCEL_GRACE_S
        ):
            if services.stage_force_cancel(stage_run_id=claim.stage_run_id, token=claim.token):
                self._interrupt(claim, StageCancelled, signal.SIGUSR1)
        elif (
            # The alarm fired and the stage did not stop (native code): time out anyway.
            state.deadline
            and now >= state.deadline + timedelta(seconds=1)
            and services.stage_force_timeout(stage_run_id=claim.stage_run_id, token=claim.token)
        ):
            self._interrupt(claim, StageTimedOut, signal.SIGUSR1)

    def _beat_riders(self, riders: tuple[services.StageClaim, ...]) -> None:
        """Extend the leases of the attempts in the watched one's batch (a forward pass
        on a slow device can outlast a lease, and another worker would start them
        again), and end those whose job's deadline passed, or whose cancel's grace ran
        out, in the database: the job ends then, not when the batch does, and the
        batch's output for it is refused. The batch itself goes on for the others."""
        if not riders:
            return
        try:
            states = services.stages_heartbeat(claims=list(riders), worker=worker_name())
            now = timezone.now()
            grace = timedelta(seconds=settings.OMNIVA_CANCEL_GRACE_S)
            for rider in riders:
                state = states.get(rider.stage_run_id)
                if state is None or not state.lease_held:
                    continue
                if state.deadline and now >= state.deadline:
                    services.stage_force_timeout(stage_run_id=rider.stage_run_id, token=rider.token)
                elif state.cancel_requested_at and now - state.cancel_requested_at >= grace:
                    services.stage_force_cancel(stage_run_id=rider.stage_run_id, token=rider.token)
        except DatabaseError as exc:
            logger.warning("heartbeat failed: %s", exc.__class__.__name__)
            connection.close()

    def _interrupt(
        self,
        claim: services.StageClaim,
        kind: type[StageInterrupted],
        signum: int,
        *,
        acknowledge: bool = True,
    ) -> None:
        if acknowledge and claim.ack_id:
            acknowledge_delivery(ack_id=claim.ack_id)
        # Signal under the lock: the main thread cannot release this attempt and start
        # the next one in between, so the signal reaches the stage it was meant for (or
        # finds its handler inactive).
        with self.changed:
            if self.claim is not claim:
                return  # the stage ended meanwhile
            self.forced = kind
            os.kill(os.getpid(), signum)


_supervisor: _Supervisor | None = None
_supervisor_started = threading.Lock()


def _the_supervisor() -> _Supervisor:
    global _supervisor
    with _supervisor_started:
        # A forked worker inherits the variable, not the thread.
        if _supervisor is None or not _supervisor.is_alive():
            _supervisor = _Supervisor()
            _supervisor.start()
        return _supervisor


@contextmanager
def supervised(
    claim: services.StageClaim, riders: tuple[services.StageClaim, ...] = ()
) -> Iterator[None]:
    """Run the body under the supervisor, with the deadline alarm and the forced-stop
    signal; `riders` are attempts batched with `claim`, whose leases it keeps alive."""
    in_stage = {"active": True}
    supervisor = _the_supervisor()

    def on_alarm(signum: int, frame: Any) -> None:
        if in_stage["active"]:
            raise StageTimedOut()

    def on_forced(signum: int, frame: Any) -> None:
        if in_stage["active"]:
            raise supervisor.forced or StageCancelled()

    is_main = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}
    if is_main:
        previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, on_forced)
        if claim.deadline is not None:
            remaining = (claim.deadline - timezone.now()).total_seconds()
            signal.setitimer(signal.ITIMER_REAL, max(0.001, remaining))
    supervisor.watch(claim, riders)
    try:
        yield
    finally:
        in_stage["active"] = False
        supervisor.release()
        if is_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def run_attempt(stage_run_id: int, grant: dict[str, Any] | None = None) -> None:
    """Run one attempt of a stage: the one the broker's claim started (`grant`), or one
    started here; every outcome goes through one orchestrator function."""
    ack_id = _current_delivery.get("ack_id")
    if grant is not None:
        claim: services.StageClaim | None = services.stage_granted(grant=grant, ack_id=ack_id)
    else:
        claim = services.stage_start(stage_run_id=stage_run_id, worker=worker_name(), ack_id=ack_id)
    if claim is None:
        return
    execute_claim(claim)


def execute_claim(claim: services.StageClaim) -> None:
    stage = _stage_of(claim)
    if (
        isinstance(stage, pipelines.Stage)
        and stage.batch is not None
        and settings.OMNIVA_GPU_MAX_BATCH > 1
    ):
        _execute_batch(claim, stage)
        return
    outcome: Any
    try:
        if isinstance(stage, StageError):
            raise stage
        if stage.run is None:  # an engine's stage: its engine runs it, never a worker
            raise StageError(
                FailureCode.UNKNOWN_STAGE, f"{claim.stage}: not run by workers", retryable=False
            )
        with supervised(claim):
            outcome = stage.run(_context(claim))
    except (StageInterrupted, Exception) as exc:
        outcome = exc
    _finish([(claim, outcome)])


def _finish(ends: list[completer.End]) -> None:
    """Attempts ended: their ends are written by this worker's completer (or at once).
    The transition that writes an end drops its queue rows in its own transaction, so
    django-q2's monitor must not acknowledge the delivery before that commits."""
    for claim, _outcome in ends:
        _acknowledged(claim)
    completer.finish(ends, _settle)


def _stage_of(claim: services.StageClaim) -> pipelines.Stage | StageError:
    definition = pipelines.get(claim.pipeline)
    if definition is None:
        return StageError(
            FailureCode.UNKNOWN_PIPELINE,
            f"Pipeline {claim.pipeline!r} is not installed here.",
            retryable=False,
        )
    try:
        return definition.dag(claim.params).stage(claim.stage)
    except Exception as exc:
        return StageError(FailureCode.UNKNOWN_STAGE, f"{claim.stage}: {exc}", retryable=False)


def _context(claim: services.StageClaim) -> StageContext:
    return StageContext(
        job_id=claim.job_id,
        stage=claim.stage,
        stage_run_id=claim.stage_run_id,
        attempt=claim.attempt,
        token=claim.token,
        params=claim.params,
        inputs=claim.inputs,
        reporter=services.stage_report,
        pipeline=claim.pipeline,
    )


def _batch_items(claim: services.StageClaim) -> int:
    """How many items one attempt adds to a forward pass (texts, for `embed`)."""
    texts = claim.params.get("texts")
    return len(texts) if isinstance(texts, list) and texts else 1


def _execute_batch(first: services.StageClaim, stage: pipelines.Stage) -> None:
    """`first` and the ready attempts of the same stage gathered with it, in one call of
    `stage.batch` (one forward pass); each attempt's outcome is its own. The supervisor
    watches `first` (its deadline, cancel or lost lease stops the batch: the others are
    put back in the queue, uncounted) and the others (their leases, deadlines, cancels)."""
    assert stage.batch is not None
    riders = gpu_worker.gather_batch(
        first,
        items=_batch_items,
        worker=worker_name(),
        max_items=settings.OMNIVA_GPU_MAX_BATCH,
        max_wait_s=settings.OMNIVA_GPU_MAX_WAIT_MS / 1000,
    )
    claims = [first, *riders]
    outcomes: list[Any]
    try:
        with supervised(first, tuple(riders)):
            outcomes = _run_batch(stage, claims)
    except StageInterrupted as exc:
        # Only `first` was stopped; the others never had their turn.
        for rider in riders:
            _release(rider, f"its batch was stopped ({type(exc).__name__})")
        _finish([(first, exc)])
        return
    now = timezone.now()
    outcomes = [
        StageTimedOut() if claim.deadline and now >= claim.deadline else outcome
        for claim, outcome in zip(claims, outcomes, strict=True)
    ]
    _finish(list(zip(claims, outcomes, strict=True)))


def _run_batch(stage: pipelines.Stage, claims: Sequence[services.StageClaim]) -> list[Any]:
    """One outcome per claim from `stage.batch`. A call that raises (a driver error, out
    of memory, an input the model chokes on) is split in halves, each run again, down to
    the attempt whose input makes it raise: only that one ends with the exception. A
    pass that was too large gets through in smaller ones."""
    assert stage.batch is not None
    try:
        outcomes = stage.batch([_context(claim) for claim in claims])
        if len(outcomes) != len(claims):
            raise RuntimeError(f"{len(outcomes)} outputs for {len(claims)} attempts")
        return list(outcomes)
    except Exception as exc:
        if len(claims) == 1:
            return [exc]
        logger.warning(
            "a batch of %d %s attempts raised %s; split in halves",
            len(claims),
            claims[0].stage,
            type(exc).__name__,
        )
        half = len(claims) // 2
        return [*_run_batch(stage, claims[:half]), *_run_batch(stage, claims[half:])]


def _release(claim: services.StageClaim, reason: str) -> None:
    try:
        services.stage_release(stage_run_id=claim.stage_run_id, token=claim.token, reason=reason)
    except DatabaseError as exc:
        # Its lease runs out and it is delivered again (then counted as lost).
        logger.warning("releasing %s of job %s failed: %s", claim.stage, claim.job_id, exc)


def _on_its_own() -> AbstractContextManager[Any]:
    """A savepoint when the caller holds a transaction (a failed statement would abort
    it, and what else it holds with it); nothing in autocommit, where each statement and
    each transition's transaction stands alone."""
    return transaction.atomic() if connection.in_atomic_block else nullcontext()


def _settle(claim: services.StageClaim, outcome: Any) -> None:
    """The one way an attempt ends: its output, or the exception it ended with."""
    if isinstance(outcome, StageCancelled):
        services.stage_cancelled(stage_run_id=claim.stage_run_id, token=claim.token)
    elif isinstance(outcome, StageTimedOut):
        services.stage_timed_out(stage_run_id=claim.stage_run_id, token=claim.token)
    elif isinstance(outcome, StageLeaseLost):
        logger.warning("stage %s lost its lease; its result is dropped", claim.stage)
    elif isinstance(outcome, StageError):
        _report_failure(claim, outcome.code, outcome.message, retryable=outcome.retryable)
    elif isinstance(outcome, BaseException):
        logger.warning(
            "stage %s raised:\n%s",
            claim.stage,
            "".join(traceback.format_exception(outcome)),
        )
        _report_failure(
            claim,
            FailureCode.STAGE_FAILED,
            f"{outcome.__class__.__name__}: {outcome}",
            retryable=True,
        )
    else:
        try:
            with _on_its_own():
                services.stage_complete(
                    stage_run_id=claim.stage_run_id,
                    token=claim.token,
                    output=outcome,
                    pipeline=claim.pipeline,
                )
        except OmnivaError as exc:
            logger.warning("completion of %s refused: %s", claim.stage, exc.message)
        except (TypeError, ValueError) as exc:
            _report_failure(
                claim,
                FailureCode.BAD_OUTPUT,
                f"The stage returned what JSON cannot hold: {exc}",
                retryable=False,
            )
        except DataError as exc:
            # A value PostgreSQL does not store (U+0000 in a string): nothing was written.
            _report_failure(
                claim,
                FailureCode.BAD_OUTPUT,
                f"The database refused the stage's output: {str(exc).strip()[:500]}",
                retryable=False,
            )


def _report_failure(
    claim: services.StageClaim, code: str, message: str, *, retryable: bool
) -> None:
    try:
        services.stage_fail(
            stage_run_id=claim.stage_run_id,
            token=claim.token,
            code=code,
            message=message,
            retryable=retryable,
        )
    except OmnivaError as exc:
        logger.warning("failure report refused: %s", exc.message)


def on_worker_spawned(sender: Any, proc_name: str, **kwargs: Any) -> None:
    """django-q2 spawned a worker process: its ends go through a completer; in the gpu
    cluster it warms up and reports."""
    from django_q.conf import Conf  # read at call time: the cluster's name is set by then

    completer.in_cluster_worker()
    if Conf.CLUSTER_NAME == GPU_QUEUE:
        gpu_worker.start_reporter(worker_name())
