"""Jobs, their stage runs and logs, and the queue table of our django-q2 broker.

A job is one run of a pipeline (a DAG of stages, see jobs/pipelines/registry.py). Each stage
has one StageRun row; the orchestrator (jobs/services/) is the only writer of the
status fields below.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from omniva.models import Project

# The NOTIFY channel of finished jobs: a transition that finishes a job notifies it with
# the job's id (jobs/services), sync submissions wait on it (jobs/waiting.py).
JOB_DONE_CHANNEL = "omniva_job_done"


class JobStatus(models.TextChoices):
    # Waiting for its first stage to start. Leaves on a stage start (→ running), a
    # cancel (→ cancelled), or when queue_timeout_s passes first (→ timed_out); one that
    # waits for an engine, also when timeout_s does (jobs/services/, _engine_deadline).
    PENDING = "pending", "Pending"
    # A stage is running or queued. Leaves when every stage completed (→ completed), a
    # stage raised (→ retrying, or → failed once retries are spent), the run time passed
    # timeout_s (→ timed_out), or a cancel reached a checkpoint or its grace ran out.
    RUNNING = "running", "Running"
    # A stage failed and waits for its next attempt (next_attempt_at). Leaves when that
    # attempt starts (→ running), on a cancel, or on a timeout.
    RETRYING = "retrying", "Retrying"
    # Every stage completed; `result` holds the pipeline's result. Final (delete, cleanup).
    COMPLETED = "completed", "Completed"
    # A stage failed with no retries left or with a permanent error; `error` says why.
    # Leaves only by a retry by hand (→ pending).
    FAILED = "failed", "Failed"
    # Cancelled by a user; `cancel_reason` says why. Leaves only by a retry (→ pending).
    CANCELLED = "cancelled", "Cancelled"
    # Not started within queue_timeout_s, or ran past timeout_s. Leaves by a retry.
    TIMED_OUT = "timed_out", "Timed out"


ACTIVE_STATUSES = (JobStatus.PENDING, JobStatus.RUNNING, JobStatus.RETRYING)
FINISHED_STATUSES = (
    JobStatus.COMPLETED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
    JobStatus.TIMED_OUT,
)
RETRYABLE_STATUSES = (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT)


class StageStatus(models.TextChoices):
    # Some parent stage has not completed yet.
    WAITING = "waiting", "Waiting"
    # Enqueued on its queue (or as an engine event); also between retry attempts.
    QUEUED = "queued", "Queued"
    # A worker holds it under a lease (lease_token, lease_expires_at).
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    TIMED_OUT = "timed_out", "Timed out"


PRIORITY_WORDS = {"low": 2, "normal": 5, "high": 8, "urgent": 10}


class Job(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    pipeline = models.CharField(max_length=100)
    params = models.JSONField(default=dict, blank=True)
    priority = models.PositiveSmallIntegerField(default=5)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING)
    progress = models.FloatField(default=0.0)
    result = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    max_retries = models.PositiveSmallIntegerField(default=3)
    timeout_s = models.PositiveIntegerField(null=True, blank=True)
    queue_timeout_s = models.PositiveIntegerField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001 (unique when set)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancel_reason = models.CharField(max_length=500, blank=True, default="")
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # When the job last became pending (submit or a retry by hand): queue_timeout_s counts
    # from here.
    pending_since = models.DateTimeField(null=True, blank=True)
    # Someone waits for the job to finish (a sync submission, jobs.waiting.wait_for_job):
    # only then does the transition that finishes it NOTIFY JOB_DONE_CHANNEL. A NOTIFY
    # per job nobody waits on would cost every finishing commit PostgreSQL's global
    # lock on its notification queue for nothing (issue 21).
    awaited = models.BooleanField(default=False, db_default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Not a column: the stages a selector read with the job, in pipeline order
    # (jobs.selectors.job_for_caller; absent otherwise, hence getattr where it is read).
    stage_list: list[StageRun]

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="jobs_job_idempotency_key_unique",
            ),
            models.CheckConstraint(condition=Q(priority__lte=10), name="jobs_job_priority_0_10"),
        ]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="jobs_job_status_created"),
            models.Index(fields=["pipeline", "-created_at"], name="jobs_job_pipeline_created"),
            models.Index(fields=["finished_at"], name="jobs_job_finished"),
            models.Index(fields=["-created_at"], name="jobs_job_created"),
        ]

    def __str__(self) -> str:
        return f"{self.pipeline} {self.id}"

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def queue_time_ms(self) -> int | None:
        if self.started_at is None:
            return None
        return round((self.started_at - self.created_at).total_seconds() * 1000)

    @property
    def run_time_ms(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000)


class StageRun(models.Model):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="stages")
    name = models.CharField(max_length=100)
    # Position in the pipeline's declaration, so stages list in the order they were declared.
    position = models.PositiveSmallIntegerField(default=0)
    status = models.CharField(
        max_length=16, choices=StageStatus.choices, default=StageStatus.WAITING
    )
    attempt = models.PositiveIntegerField(default=0)
    # `attempt` when the job was last retried by hand: the automatic retries allowed
    # (max_retries) count from here, while `attempt` keeps counting every run.
    attempt_floor = models.PositiveIntegerField(default=0)
    queue = models.CharField(max_length=50, blank=True, default="")
    engine_type = models.CharField(max_length=100, blank=True, default="")
    worker = models.CharField(max_length=200, blank=True, default="")
    lease_token = models.UUIDField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    progress = models.FloatField(default=0.0)
    output = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job", "position"]
        constraints = [
            models.UniqueConstraint(fields=["job", "name"], name="jobs_stagerun_job_name_unique")
        ]
        # The Prometheus figures read the runs finished since their tallies' cursor.
        indexes = [models.Index(fields=["finished_at"], name="jobs_stagerun_finished")]

    def __str__(self) -> str:
        return f"{self.job_id}:{self.name}"

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds() * 1000)


class JobLog(models.Model):
    class Level(models.TextChoices):
        DEBUG = "debug"
        INFO = "info"
        WARNING = "warning"
        ERROR = "error"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="logs")
    stage = models.CharField(max_length=100, blank=True, default="")
    at = models.DateTimeField(auto_now_add=True)
    level = models.CharField(max_length=10, choices=Level.choices, default=Level.INFO)
    message = models.TextField()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["job", "id"], name="jobs_joblog_job_id")]

    def __str__(self) -> str:
        return f"{self.at:%H:%M:%S} {self.level} {self.message[:60]}"


class QueueTask(models.Model):
    """One delivery unit of our django-q2 broker (jobs/broker.py).

    A row is ready when `visible_at` has passed. A claim moves `visible_at` forward by
    the lease and bumps `deliveries`; the worker's heartbeat keeps moving it while the
    task runs; the acknowledgement deletes the row. A worker that dies stops the
    heartbeat, the lease runs out, and the next claim delivers the row again.
    """

    queue = models.CharField(max_length=50)
    priority = models.PositiveSmallIntegerField(default=5)
    payload = models.TextField()
    visible_at = models.DateTimeField()
    deliveries = models.PositiveIntegerField(default=0)
    # The stage run this task executes, when it executes one (cancel/delete drop its rows).
    stage_run_id = models.BigIntegerField(null=True, blank=True, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            models.Index(fields=["queue", "-priority", "id"], name="jobs_queuetask_claim_order")
        ]

    def __str__(self) -> str:
        return f"{self.queue}#{self.pk} p{self.priority}"


class GpuWorkerReport(models.Model):
    """What a gpu worker process last said about itself (jobs/pipelines/lib/inference.py):
    its device, memory, utilization, loaded models and batch statistics. Written every few seconds;
    a report older than a few intervals belongs to a worker that stopped."""

    worker = models.CharField(max_length=200, primary_key=True)
    reported_at = models.DateTimeField()
    data = models.JSONField(default=dict)

    def __str__(self) -> str:
        return f"{self.worker} at {self.reported_at:%H:%M:%S}"


class MetricTally(models.Model):
    """Prometheus' job figures (omniva/metrics.py) of everything finished (or, for
    `submitted`, created) up to the cursor (`MetricCursor`), so that a scrape reads only
    the rows since, and the retention pass deleting old jobs lowers no counter.

    `kind` is `submitted` (labels: pipeline), `finished` (pipeline, status),
    `job_duration` (pipeline) or `stage_duration` (pipeline, stage, queue); durations
    carry their sum and cumulative bucket counts (jobs.selectors.DURATION_BUCKETS).
    """

    kind = models.CharField(max_length=20)
    labels = models.JSONField()
    count = models.BigIntegerField(default=0)
    total_s = models.FloatField(default=0.0)
    buckets = models.JSONField(default=list)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["kind", "labels"], name="jobs_metrictally_unique")
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.labels}: {self.count}"


class MetricCursor(models.Model):
    """The one row: how far MetricTally counts (rows finished or created at or before
    `through`)."""

    through = models.DateTimeField()

    def __str__(self) -> str:
        return f"tallied through {self.through:%Y-%m-%d %H:%M:%S}"
