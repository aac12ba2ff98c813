"""The transitions of one attempt of a worker stage: start, report, heartbeat, and its end
(complete, fail, cancelled, timed out, released). Called by the worker runtime.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import Max
from django.utils import timezone
from django_q.signing import SignedPackage

from engines import services as engines
from jobs import broker
from jobs.models import (
    Job,
    JobStatus,
    StageRun,
    StageStatus,
)
from jobs.pipelines import registry as pipelines
from jobs.pipelines.context import StageCancelled, StageLeaseLost, StageTimedOut
from jobs.services.activity import _job_changed, _stage_changed
from jobs.services.core import (
    StageClaim,
    SupervisionState,
    _deadline,
    _enqueue_stage,
    _expire_if_queue_timed_out,
    _finish_job,
    _lease_until,
    _lock_job_of_stage,
    _log,
    _parent_outputs,
    _time_out,
    _update_progress,
    pipeline_named,
)
from jobs.services.dag_completion import stages_complete_dag
from jobs.services.fastpath import (
    Completion,
    stages_complete_sole,
    stages_heartbeat,
    stages_start_granted,
)
from omniva.errors import ErrorCode, FailureCode, OmnivaError


def stage_start(*, stage_run_id: int, worker: str, ack_id: str | None = None) -> StageClaim | None:
    """Grant one attempt of a queued stage to `worker`, or None when it must not run.

    A stage still `running` whose lease ran out belongs to a worker that died: that
    attempt counts as failed, and this delivery is the next attempt if one is left.
    """
    started = stages_start_granted(ack_ids={stage_run_id: ack_id}, worker=worker)
    if started:
        return started[0]
    with transaction.atomic():
        locked = _lock_job_of_stage(stage_run_id)
        if locked is None:
            return None
        job, run = locked
        now = timezone.now()
        if job.is_finished:
            return None
        if ack_id and not broker.delivery_is_current(ack_id=ack_id):
            return None  # a row of an ended attempt, or one delivered again since
        if job.cancel_requested_at:
            _finish_job(job, JobStatus.CANCELLED, now=now)
            return None
        if _expire_if_queue_timed_out(job, now):
            return None
        deadline = _deadline(job)
        if deadline and now >= deadline:
            _time_out(job, now, f"Ran past timeout_s ({job.timeout_s} s).")
            return None
        if run.status == StageStatus.RUNNING:
            if run.lease_expires_at and run.lease_expires_at > now:
                # The attempt's lease has not quite run out (the row's lease started a
                # moment before it, at the claim): look again when it has.
                if ack_id:
                    broker.defer_delivery(
                        ack_id=ack_id, until=run.lease_expires_at + timedelta(milliseconds=50)
                    )
                return None
            lost = {
                "code": FailureCode.WORKER_LOST,
                "message": f"The worker running attempt {run.attempt} stopped responding.",
                "stage": run.name,
            }
            _log(job, lost["message"], stage=run.name, level="warning")
            if run.attempt - run.attempt_floor > job.max_retries:
                run.status = StageStatus.FAILED
                run.error = lost
                run.finished_at = now
                run.save()
                _finish_job(job, JobStatus.FAILED, now=now, error=lost)
                return None
        elif run.status != StageStatus.QUEUED:
            return None
        run.attempt += 1
        run.status = StageStatus.RUNNING
        run.lease_token = uuid.uuid4()
        run.lease_expires_at = _lease_until(now)
        run.worker = worker[:200]
        run.started_at = now
        run.finished_at = None
        run.progress = 0.0
        run.error = None
        fields = ["attempt", "status", "lease_token", "lease_expires_at", "worker", "started_at"]
        run.save(update_fields=[*fields, "finished_at", "progress", "error"])
        job.attempts = max(job.attempts, run.attempt)
        job.status = JobStatus.RUNNING
        job.next_attempt_at = None
        if job.started_at is None:
            job.started_at = now
        job.save(
            update_fields=["attempts", "status", "next_attempt_at", "started_at", "updated_at"]
        )
        _job_changed(job)
        _stage_changed(job, run)
        return StageClaim(
            stage_run_id=run.pk,
            job_id=str(job.pk),
            pipeline=job.pipeline,
            stage=run.name,
            attempt=run.attempt,
            token=str(run.lease_token),
            params=job.params,
            inputs=_parent_outputs(job.pk, job.pipeline, job.params, run.name),
            deadline=_deadline(job),
            ack_id=ack_id,
        )


def _held_run(stage_run_id: int, token: str) -> tuple[Job, StageRun]:
    """Lock the job of a running stage whose lease `token` still holds, or raise."""
    locked = _lock_job_of_stage(stage_run_id)
    if locked is None:
        raise OmnivaError(ErrorCode.STAGE_LEASE_LOST, "The stage run no longer exists.")
    job, run = locked
    if run.status != StageStatus.RUNNING or str(run.lease_token) != str(token):
        raise OmnivaError(
            ErrorCode.STAGE_LEASE_LOST,
            f"Attempt token of {job.pipeline}.{run.name} is stale; the result is dropped.",
        )
    return job, run


def stage_report(
    *,
    stage_run_id: int,
    token: str,
    progress: float | None = None,
    message: str | None = None,
    level: str = "info",
) -> None:
    """A checkpoint: record progress and a log line, extend the lease, and raise
    StageInterrupted when the attempt must stop (cancelled, timed out, lease lost)."""
    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            raise StageLeaseLost() from None
        now = timezone.now()
        if job.is_finished:
            raise StageLeaseLost()  # ended by someone else: nothing of this attempt is kept
        if job.cancel_requested_at:
            raise StageCancelled()
        deadline = _deadline(job)
        if deadline and now >= deadline:
            raise StageTimedOut()
        fields = ["lease_expires_at"]
        run.lease_expires_at = _lease_until(now)
        if progress is not None:
            run.progress = progress
            fields.append("progress")
        run.save(update_fields=fields)
        if progress is not None:
            _update_progress(job)
            job.save(update_fields=["progress", "updated_at"])
            _stage_changed(job, run)
            _job_changed(job, "job:progress")
        if message:
            _log(job, message, stage=run.name, level=level)


def stage_heartbeat(*, claim: StageClaim, worker: str) -> SupervisionState:
    """Extend the attempt's lease and its queue row's; report a cancel or the deadline."""
    held = stages_heartbeat(claims=[claim], worker=worker)
    return held.get(claim.stage_run_id, SupervisionState(lease_held=False))


def _drop_queue_rows(run: StageRun) -> None:
    """The attempt ended: every queue row of its run goes, in the transition's own
    transaction (one commit fewer than django-q2's acknowledgement after the task
    returned, and never one without the other). Every row, not only this delivery's: a
    row delivered again while its first delivery waited in a worker's buffer is the same
    run's, and left behind it would start the retry before its backoff."""
    broker.drop_stage_tasks(stage_run_ids=[run.pk])


def stage_complete(
    *, stage_run_id: int, token: str, output: Any, pipeline: str | None = None
) -> None:
    """Store the output; start every child whose parents all completed; finish the job
    when every stage has. A stale token changes nothing (STAGE_LEASE_LOST). `pipeline`,
    when the caller knows the job's: a pipeline of several stages skips the
    one-statement completion, which only completes one-stage jobs. The common case
    goes through the few statements of dag_completion; the rest (a cancel requested, a
    child of a batch, a stale token) through the transition below."""
    completion = Completion(stage_run_id, token, output)
    sole = pipeline is None or pipeline in pipelines.single_stage_pipelines()
    if sole and stages_complete_sole([completion]):
        return
    with transaction.atomic():
        if stages_complete_dag([completion]):
            return
    with transaction.atomic():
        job, run = _held_run(stage_run_id, token)
        now = timezone.now()
        if job.is_finished:
            raise OmnivaError(ErrorCode.STAGE_LEASE_LOST, "The job already ended.")
        run.status = StageStatus.COMPLETED
        run.output = output
        run.progress = 100.0
        run.finished_at = now
        run.lease_token = None
        run.lease_expires_at = None
        run.error = None
        run.save(
            update_fields=[
                "status",
                "output",
                "progress",
                "finished_at",
                "lease_token",
                "lease_expires_at",
                "error",
            ]
        )
        _drop_queue_rows(run)
        _stage_changed(job, run)
        if job.cancel_requested_at:
            _finish_job(job, JobStatus.CANCELLED, now=now)
            return
        definition = pipeline_named(job.pipeline)
        dag = definition.dag(job.params)
        others = StageRun.objects.filter(job=job).exclude(pk=run.pk) if len(dag.order) > 1 else []
        runs = {r.name: r for r in others}
        runs[run.name] = run
        if all(r.status == StageStatus.COMPLETED for r in runs.values()):
            outputs = {name: r.output for name, r in runs.items()}
            result = definition.result(outputs, dag)
            _finish_job(job, JobStatus.COMPLETED, now=now, result=result, runs=list(runs.values()))
            return
        for child in dag.children(run.name):
            child_run = runs[child]
            if child_run.status != StageStatus.WAITING:
                continue
            if all(runs[p].status == StageStatus.COMPLETED for p in dag.stage(child).depends_on):
                _enqueue_stage(job, child_run, dag.stage(child))
        # Every run of the job is in `runs` (as _update_progress would read them).
        job.progress = round(sum(r.progress for r in runs.values()) / len(runs), 2)
        job.save(update_fields=["progress", "updated_at"])
        _job_changed(job, "job:progress")
        return


def stage_fail(
    *,
    stage_run_id: int,
    token: str,
    code: str,
    message: str,
    retryable: bool = True,
) -> Job:
    """A failed attempt: retry after the backoff while retries are left, else fail the job."""
    with transaction.atomic():
        job, run = _held_run(stage_run_id, token)
        now = timezone.now()
        if job.is_finished:
            raise OmnivaError(ErrorCode.STAGE_LEASE_LOST, "The job already ended.")
        # The run's row is written before its queue rows go, the order a heartbeat
        # takes them in (stage run, then queue row).
        error = {"code": code, "message": message[:2000], "stage": run.name, "attempt": run.attempt}
        run.error = error
        run.lease_token = None
        run.lease_expires_at = None
        if job.cancel_requested_at:
            run.status = StageStatus.CANCELLED
            run.finished_at = now
            run.save()
            _finish_job(job, JobStatus.CANCELLED, now=now)  # drops the run's rows
            return job
        retries_used = run.attempt - run.attempt_floor
        if retryable and retries_used <= job.max_retries:
            delay = engines.retry_backoff_s(retries_used)
            run.save()
            _drop_queue_rows(run)
            _log(
                job,
                f"attempt {run.attempt} failed: {code}: {message[:500]}; retry in {delay} s",
                stage=run.name,
                level="warning",
            )
            _enqueue_stage(
                job,
                run,
                pipeline_named(job.pipeline).dag(job.params).stage(run.name),
                delay_s=delay,
            )
            job.status = JobStatus.RETRYING
            job.next_attempt_at = now + timedelta(seconds=delay)
            job.save(update_fields=["status", "next_attempt_at", "updated_at"])
            _job_changed(job)
            return job
        run.status = StageStatus.FAILED
        run.finished_at = now
        run.save()
        _drop_queue_rows(run)
        _stage_changed(job, run)
        _finish_job(
            job,
            JobStatus.FAILED,
            now=now,
            error={"code": code, "message": message[:2000], "stage": run.name},
        )
        return job


def stage_cancelled(*, stage_run_id: int, token: str) -> Job | None:
    """The stage stopped at a checkpoint because its job was cancelled."""
    with transaction.atomic():
        try:
            job, _run = _held_run(stage_run_id, token)
        except OmnivaError:
            return None
        if not job.is_finished:
            _finish_job(job, JobStatus.CANCELLED, now=timezone.now())
        return job


def stage_timed_out(*, stage_run_id: int, token: str) -> Job | None:
    """The stage ran past its job's timeout_s and was stopped."""
    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            return None
        if not job.is_finished:
            _time_out(
                job, timezone.now(), f"Ran past timeout_s ({job.timeout_s} s).", stage=run.name
            )
        return job


def stage_force_cancel(*, stage_run_id: int, token: str) -> bool:
    """The grace after a cancel ran out and the stage did not stop: end the job anyway,
    revoking the attempt's token so whatever it returns later is dropped."""
    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            return False
        if job.is_finished or not job.cancel_requested_at:
            return False
        _log(
            job,
            "stage did not stop within the cancel grace period; forced",
            stage=run.name,
            level="warning",
        )
        _finish_job(job, JobStatus.CANCELLED, now=timezone.now())
        return True


def stage_force_timeout(*, stage_run_id: int, token: str) -> bool:
    """The stage ran past the deadline and did not stop at the alarm: time the job out."""
    return stage_timed_out(stage_run_id=stage_run_id, token=token) is not None


def stage_release(*, stage_run_id: int, token: str, reason: str) -> Job | None:
    """Put a started attempt back in its queue, ready at once and not counted: it never
    had its turn (the gpu batch it was gathered into was stopped by another job's cancel,
    deadline or lost lease). Its attempt number is given back, so neither its retries
    nor `attempts` count it. A job cancelled meanwhile ends cancelled, one past its
    deadline times out; a stale token changes nothing (None)."""
    with transaction.atomic():
        try:
            job, run = _held_run(stage_run_id, token)
        except OmnivaError:
            return None
        now = timezone.now()
        if job.is_finished:
            return job
        if job.cancel_requested_at:
            _finish_job(job, JobStatus.CANCELLED, now=now)
            return job
        deadline = _deadline(job)
        if deadline and now >= deadline:
            _time_out(job, now, f"Ran past timeout_s ({job.timeout_s} s).", stage=run.name)
            return job
        run.attempt -= 1
        run.status = StageStatus.QUEUED
        run.queued_at = now
        run.started_at = None
        run.lease_token = None
        run.lease_expires_at = None
        run.save(
            update_fields=[
                "attempt", "status", "queued_at", "started_at", "lease_token", "lease_expires_at",
            ]
        )  # fmt: skip
        # The fresh row below is the one delivery of the next attempt. The run's rows
        # are dropped after it is written, the order a heartbeat takes them in.
        _drop_queue_rows(run)
        _log(job, f"attempt {run.attempt + 1} released, not counted: {reason}", stage=run.name)
        _stage_changed(job, run)
        _enqueue_stage(
            job, run, pipeline_named(job.pipeline).dag(job.params).stage(run.name), saved=True
        )
        attempts = StageRun.objects.filter(job=job).aggregate(most=Max("attempt"))["most"]
        if attempts != job.attempts:
            job.attempts = attempts or 0
            job.save(update_fields=["attempts", "updated_at"])
            _job_changed(job)
        return job


# Why a stopping cluster's unhanded tasks are released (stage_release's log line).
NEVER_HANDED_OUT = "its cluster stopped before a worker took it"


def tasks_give_back(tasks: list[tuple[str, str]]) -> None:
    """Put back the tasks (ack id, signed payload) a stopping pusher claimed but never
    handed out (PostgresBroker.stash_give_back): a task whose stage the claim started is
    released, not counted (stage_release: a fresh row, ready now); any other is made
    visible again now."""
    for ack_id, payload in tasks:
        grant = SignedPackage.loads(payload).get("kwargs", {}).get("grant")
        if grant:
            stage_release(
                stage_run_id=grant["stage_run_id"], token=grant["token"], reason=NEVER_HANDED_OUT
            )
        else:
            broker.defer_delivery(ack_id=ack_id, until=timezone.now())
