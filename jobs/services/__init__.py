"""The orchestrator: every transition of a job and its stage runs, one function each.

Each function runs in one transaction and locks the job row first (SELECT … FOR
UPDATE), so the transitions of one job are serialized whichever process makes them:
two parallel stages completing at once cannot both miss that the job is done. Lock
order is child job before batch parent, never the reverse.

Enqueueing is an INSERT into the broker's table in the same transaction, and the
NOTIFYs (queue wake-ups, job finished) are transactional too: a task or a wake-up
exists exactly when the transition that made it committed.

The transitions live in modules by what they are about (core, submit, attempts,
fastpath, dag_completion, engine_stages, lifecycle, retention, activity); this package
re-exports them, so callers write `from jobs import services` and `services.job_submit(...)`.
"""

from __future__ import annotations

from jobs.services.attempts import (
    stage_cancelled,
    stage_complete,
    stage_fail,
    stage_force_cancel,
    stage_force_timeout,
    stage_heartbeat,
    stage_release,
    stage_report,
    stage_start,
    stage_timed_out,
    tasks_give_back,
)
from jobs.services.core import (
    BATCH_PIPELINE,
    SATURATION_CACHE_S,
    StageClaim,
    SupervisionState,
    job_await,
    pipeline_named,
    queue_depth,
    queue_depths_forget,
    queue_guard,
    task_payload,
)
from jobs.services.dag_completion import (
    COMPLETE_DAG_STAGES_SQL,
    RUNS_OF_JOBS_SQL,
    STEP_WRITES_SQL,
    stages_complete_dag,
)
from jobs.services.engine_stages import (
    engine_stage_callbacks,
    stage_engine_claimed,
    stage_engine_expire,
    stage_engine_finished,
    stage_engine_progress,
)
from jobs.services.fastpath import (
    CLAIM_START_SQL,
    COMPLETE_SOLE_STAGE_SQL,
    HEARTBEAT_SQL,
    START_SQL,
    Completion,
    stage_granted,
    stages_complete_sole,
    stages_heartbeat,
    stages_start_granted,
    tasks_claim_starting,
)
from jobs.services.lifecycle import (
    QUERY_EMBEDDING_TIMEOUT_S,
    gpu_report_save,
    job_cancel,
    job_cancel_child,
    job_delete,
    job_expire_if_due,
    job_files,
    job_may_be_due,
    job_retry,
    jobs_settle_due,
    query_embedding_make,
)
from jobs.services.retention import (
    CLEANUP_MAX_AGE_S,
    JOB_PRUNE_BATCH,
    RETENTION_EVERY_MIN,
    RETENTION_SCHEDULE,
    RETENTION_TASK,
    jobs_cleanup,
    jobs_prune,
    metric_tallies_advance,
    retention_run,
)
from jobs.services.submit import (
    job_submit,
    job_submit_batch,
    parse_priority,
)

__all__ = [
    "BATCH_PIPELINE",
    "CLAIM_START_SQL",
    "CLEANUP_MAX_AGE_S",
    "COMPLETE_DAG_STAGES_SQL",
    "COMPLETE_SOLE_STAGE_SQL",
    "HEARTBEAT_SQL",
    "JOB_PRUNE_BATCH",
    "QUERY_EMBEDDING_TIMEOUT_S",
    "RETENTION_EVERY_MIN",
    "RETENTION_SCHEDULE",
    "RETENTION_TASK",
    "RUNS_OF_JOBS_SQL",
    "SATURATION_CACHE_S",
    "START_SQL",
    "STEP_WRITES_SQL",
    "Completion",
    "StageClaim",
    "SupervisionState",
    "engine_stage_callbacks",
    "gpu_report_save",
    "job_await",
    "job_cancel",
    "job_cancel_child",
    "job_delete",
    "job_expire_if_due",
    "job_files",
    "job_may_be_due",
    "job_retry",
    "job_submit",
    "job_submit_batch",
    "jobs_cleanup",
    "jobs_prune",
    "jobs_settle_due",
    "metric_tallies_advance",
    "parse_priority",
    "pipeline_named",
    "query_embedding_make",
    "queue_depth",
    "queue_depths_forget",
    "queue_guard",
    "retention_run",
    "stage_cancelled",
    "stage_complete",
    "stage_engine_claimed",
    "stage_engine_expire",
    "stage_engine_finished",
    "stage_engine_progress",
    "stage_fail",
    "stage_force_cancel",
    "stage_force_timeout",
    "stage_granted",
    "stage_heartbeat",
    "stage_release",
    "stage_report",
    "stage_start",
    "stage_timed_out",
    "stages_complete_dag",
    "stages_complete_sole",
    "stages_heartbeat",
    "stages_start_granted",
    "task_payload",
    "tasks_claim_starting",
    "tasks_give_back",
]
