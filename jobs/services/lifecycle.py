"""The job transitions users make (cancel, retry, delete), the time-based ending of a job
read past its deadline, gpu worker reports and query embeddings.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs import broker, selectors
from jobs.models import (
    ACTIVE_STATUSES,
    RETRYABLE_STATUSES,
    GpuWorkerReport,
    Job,
    JobStatus,
    StageRun,
    StageStatus,
)
from jobs.services.activity import _job_changed, _stage_changed
from jobs.services.core import (
    BATCH_PIPELINE,
    _batch_child_finished,
    _batch_reopen,
    _cancel_grace,
    _enqueue_stage,
    _expire_if_queue_timed_out,
    _finish_job,
    _lock_job,
    _log,
    _update_progress,
    pipeline_named,
)
from jobs.services.engine_stages import _expire_engine_job
from jobs.services.submit import job_submit
from jobs.waiting import wait_for_job
from omniva import media
from omniva import services as core_services
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Project


def job_cancel(*, job_id: Any, reason: str = "") -> tuple[Job, bool]:
    """Cancel a job: (job, finished_now). A job with a running stage is marked and stops at
    its next checkpoint (finished_now False); any other active job is cancelled at once."""
    with transaction.atomic():
        job = _lock_job(job_id)
        now = timezone.now()
        if job.is_finished:
            raise OmnivaError(
                ErrorCode.JOB_NOT_CANCELLABLE, f"Job {job.pk} already ended ({job.status})."
            )
        if not job.cancel_requested_at:
            job.cancel_requested_at = now
            job.cancel_reason = (reason or "cancelled by request")[:500]
            job.save(update_fields=["cancel_requested_at", "cancel_reason", "updated_at"])
            _log(job, f"cancel requested: {job.cancel_reason}")
            _job_changed(job)
        if job.pipeline != BATCH_PIPELINE:
            return _cancel_or_mark(job, now)
    return _batch_cancel(job, now)


def _cancel_or_mark(job: Job, now: datetime) -> tuple[Job, bool]:
    """Under the job's lock: cancelled now, or marked to stop at a running stage's next
    checkpoint (cancelled anyway once the grace ran out)."""
    running = StageRun.objects.filter(job=job, status=StageStatus.RUNNING)
    live = running.filter(lease_expires_at__gt=now)
    assert job.cancel_requested_at is not None
    overdue = now - job.cancel_requested_at >= _cancel_grace()
    if live.exists() and not overdue:
        return job, False
    _finish_job(job, JobStatus.CANCELLED, now=now)
    return job, True


def _batch_cancel(parent: Job, now: datetime) -> tuple[Job, bool]:
    """Cancel a batch's children, then settle the batch. A child that finishes locks its
    own row, then its parent's (`_batch_child_finished`): the one lock order is child,
    then parent. So the parent's lock is not held here while each child is cancelled,
    in a transaction of its own; the parent, marked `cancel_requested_at` already, ends
    `cancelled` once its last child has, whoever settles it."""
    active = parent.children.filter(status__in=ACTIVE_STATUSES).order_by("created_at", "id")
    for child_id in list(active.values_list("pk", flat=True)):
        job_cancel_child(child_id=child_id, reason=parent.cancel_reason)
    with transaction.atomic():
        _batch_child_finished(parent_id=parent.pk, now=now)
    parent.refresh_from_db()
    return parent, parent.is_finished


def job_cancel_child(*, child_id: Any, reason: str) -> None:
    with contextlib.suppress(OmnivaError):  # it ended meanwhile
        job_cancel(job_id=child_id, reason=reason)


def job_retry(*, job_id: Any) -> Job:
    """Run a failed, cancelled or timed-out job again: only the stages that did not
    complete run, with their retry allowance renewed."""
    with transaction.atomic():
        job = _lock_job(job_id)
        if job.status not in RETRYABLE_STATUSES:
            raise OmnivaError(
                ErrorCode.JOB_NOT_RETRYABLE,
                f"Job {job.pk} is {job.status}; only failed, cancelled or timed-out jobs retry.",
            )
        now = timezone.now()
        job.status = JobStatus.PENDING if job.pipeline != BATCH_PIPELINE else JobStatus.RUNNING
        job.error = None
        job.result = None
        job.finished_at = None
        job.cancel_requested_at = None
        job.cancel_reason = ""
        job.next_attempt_at = None
        job.pending_since = now
        job.started_at = now if job.pipeline == BATCH_PIPELINE else None
        job.save()
        _log(job, "retried by request")
        if job.pipeline == BATCH_PIPELINE:
            _job_changed(job)
            for child in job.children.filter(status__in=RETRYABLE_STATUSES).order_by("created_at"):
                job_retry(job_id=child.pk)
            _batch_child_finished(parent_id=job.pk, now=now)
            job.refresh_from_db()
            return job
        definition = pipeline_named(job.pipeline)
        dag = definition.dag(job.params)
        runs = {run.name: run for run in StageRun.objects.filter(job=job)}
        if runs and all(run.status == StageStatus.COMPLETED for run in runs.values()):
            # Every stage completed (a cancel came as the last one finished): nothing is
            # left to run, and a job left pending with nothing queued would wait forever.
            # The retry completes it, with the result its stages made.
            job.started_at = now
            if job.parent_id:
                _batch_reopen(parent_id=job.parent_id, now=now)
            outputs = {name: run.output for name, run in runs.items()}
            result = definition.result(outputs, dag)
            _finish_job(job, JobStatus.COMPLETED, now=now, result=result, runs=list(runs.values()))
            return job
        for run in runs.values():
            if run.status == StageStatus.COMPLETED:
                continue
            run.status = StageStatus.WAITING
            run.attempt_floor = run.attempt
            run.error = None
            run.output = None
            run.progress = 0.0
            run.lease_token = None
            run.lease_expires_at = None
            run.started_at = None
            run.finished_at = None
            run.save()
            if not all(
                runs[p].status == StageStatus.COMPLETED for p in dag.stage(run.name).depends_on
            ):
                _stage_changed(job, run)  # waiting; the queued ones are told by the enqueue
        for name in dag.order:
            run = runs[name]
            if run.status == StageStatus.WAITING and all(
                runs[p].status == StageStatus.COMPLETED for p in dag.stage(name).depends_on
            ):
                _enqueue_stage(job, run, dag.stage(name))
        _update_progress(job)
        job.save(update_fields=["progress", "updated_at"])
        _job_changed(job)  # after the stages: the progress it shows is the reset one
        if job.parent_id:
            _batch_reopen(parent_id=job.parent_id, now=now)
        return job


def job_files(job_id: Any) -> Path:
    """The folder of a job's files under the media root (removed with the job)."""
    return Path(settings.MEDIA_ROOT) / "jobs" / str(job_id)


def _job_files_delete(job_id: Any) -> None:
    """A job's scratch folder, and its artifacts where they are not in that folder (a
    bucket)."""
    shutil.rmtree(job_files(job_id), ignore_errors=True)
    if not media.is_local_storage():
        media.artifacts_delete(media.job_artifact_name(job_id, ""))


def jobs_files_delete(job_ids: list[Any]) -> None:
    """The files of deleted jobs (after their transaction committed)."""
    for job_id in job_ids:
        _job_files_delete(job_id)


def job_delete(*, job_id: Any) -> None:
    """Remove a finished job with its stages, logs, children and files."""
    with transaction.atomic():
        job = _lock_job(job_id)
        if not job.is_finished:
            raise OmnivaError(
                ErrorCode.JOB_ACTIVE, f"Job {job.pk} is {job.status}; cancel it before deleting."
            )
        ids = [job.pk, *job.children.values_list("pk", flat=True)]
        broker.drop_stage_tasks(
            stage_run_ids=list(StageRun.objects.filter(job_id__in=ids).values_list("pk", flat=True))
        )
        for deleted in ids:
            core_services.activity_record(
                kind="job:deleted",
                data={"id": deleted},
                job_id=deleted,
                project_id=job.project_id,
            )
        job.delete()
        transaction.on_commit(functools.partial(jobs_files_delete, ids))


def job_may_be_due(job: Job) -> bool:
    """Whether a read of `job` should settle it (job_expire_if_due): it is active and past
    queue_timeout_s or timeout_s as far as its own row tells (no query)."""
    if job.status not in ACTIVE_STATUSES:
        return False
    since = job.started_at or job.pending_since
    limits = [job.timeout_s] if job.started_at else [job.timeout_s, job.queue_timeout_s]
    shortest = min((limit for limit in limits if limit), default=None)
    return bool(since and shortest and timezone.now() >= since + timedelta(seconds=shortest))


def job_expire_if_due(*, job_id: Any) -> Job:
    """Time out a job past a deadline that no worker enforces (read paths call this, so a
    queue with no worker at all, or an engine type with no engine, still reports
    TIMEOUT): one still waiting past queue_timeout_s, or one whose engine stage is past
    its deadline (`_engine_deadline`)."""
    with transaction.atomic():
        job = _lock_job(job_id)
        now = timezone.now()
        if job.status == JobStatus.PENDING and _expire_if_queue_timed_out(job, now):
            return job
        if job.status in ACTIVE_STATUSES:
            engine_run = (
                StageRun.objects.filter(
                    job=job, status__in=[StageStatus.QUEUED, StageStatus.RUNNING]
                )
                .exclude(engine_type="")
                .order_by("position")
                .first()
            )
            if engine_run is not None:
                _expire_engine_job(job, engine_run, now)
        return job


def jobs_settle_due(*, jobs: Sequence[Job]) -> list[Job]:
    """The jobs as every read shows them (the list, the detail, the live snapshots, gRPC,
    the submit command): those past a deadline that no worker enforces are timed out
    first (job_expire_if_due) and read again with their stages; the others are returned
    as they are. Deciding costs no query (job_may_be_due), so a page with nothing due
    costs nothing more."""
    settled = list(jobs)
    for index, job in enumerate(settled):
        if job_may_be_due(job):
            try:
                job_expire_if_due(job_id=job.pk)
            except OmnivaError:  # deleted since it was read: shown as it was read
                continue
            fresh = selectors.job_for_caller(job_id=job.pk, project=None, with_stages=True)
            if fresh is not None:
                settled[index] = fresh
    return settled


# --- gpu worker status -------------------------------------------------------------------


def gpu_report_save(*, worker: str, data: dict[str, Any]) -> None:
    """A gpu worker's status report (jobs/pipelines/lib/inference.py), replacing its previous
    one."""
    GpuWorkerReport.objects.update_or_create(
        worker=worker[:200], defaults={"reported_at": timezone.now(), "data": data}
    )


# --- query embeddings (clip search) ------------------------------------------------------

QUERY_EMBEDDING_TIMEOUT_S = 15.0


def query_embedding_make(*, text: str, project: Project | None) -> list[float]:
    """The vector of `text`, made by an `embed_texts` job on the gpu queue (batched with
    whatever else waits there), so no web process loads a model. 503 when no gpu
    worker made it in time (the job is cancelled)."""
    job, _ = job_submit(
        pipeline="embed_texts", params={"texts": [text]}, project=project, awaited=True
    )
    job = wait_for_job(job.pk, timeout_s=QUERY_EMBEDDING_TIMEOUT_S)
    if job.status == JobStatus.COMPLETED:
        return (job.result or {})["vectors"][0]
    if not job.is_finished:
        with contextlib.suppress(OmnivaError):
            job_cancel(job_id=job.pk, reason="the search gave up waiting")
    raise OmnivaError(
        ErrorCode.SERVICE_UNAVAILABLE,
        "No gpu worker embedded the query in time; try again later.",
        status=503,
    )
