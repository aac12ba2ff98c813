"""The completion of stages of many-stage pipelines, many per transaction in three
statements (the batch completer's second path, next to fastpath's one-stage completion).

stage_complete does the same for one stage in about a dozen statements: it locks the
job, completes the run, drops its queue rows, reads the job's runs, queues each child
whose parents all completed (or completes the job), and writes the job's progress, each
with its outbox row. Here a whole batch of ends takes three:

1. COMPLETE_DAG_STAGES_SQL locks the jobs (in id order, like every transition that
   locks several), completes each run whose attempt's token still holds, drops its
   queue rows and writes its `stage:update`.
2. RUNS_OF_JOBS_SQL reads the stage runs of those jobs. It has to be a statement of its
   own: a statement reads other rows as they were when it began, before it waited for
   the jobs' locks, and the sibling completed by the transaction it waited for would
   look still running (both would leave the join stage waiting). A statement that
   begins once the locks are held sees every committed sibling and this batch's own.
3. Python decides from the DAG (the pipeline's, for the job's params) what follows:
   the children to queue with their signed tasks, each job's progress, and the result
   of each job whose stages have all completed. STEP_WRITES_SQL writes all of it with
   the outbox rows and NOTIFYs the Python transitions write.

Only the common case goes this way: a job that is neither finished nor cancelled, nor
a child of a batch (its end settles the batch, _batch_child_finished). A run this
refuses (its token no longer holds, or its job is not of that case) is left as it was,
for stage_complete to decide under the full rules. A child stage run by an engine is
queued by `_enqueue_stage` (its event), in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from jobs import broker
from jobs.models import (
    FINISHED_STATUSES,
    JOB_DONE_CHANNEL,
    Job,
    StageRun,
    StageStatus,
)
from jobs.services.activity import JOB_FIELDS, STAGE_FIELDS, payload_sql
from jobs.services.core import _enqueue_stage, json_column, pipeline_named, stage_task
from jobs.services.fastpath import Completion, _with_payloads
from omniva.models import ACTIVITY_CHANNEL
from omniva.prepared import prepared_cursor

# 1. The runs completed, their queue rows dropped; the ids of those completed. Each row is
# reached from the batch's ids (fastpath's module: plans that do not depend on
# statistics).
COMPLETE_DAG_STAGES_SQL = _with_payloads("""
WITH {held_runs}, target AS (
    SELECT held.run_id, held.job_id, j.project_id
    FROM (SELECT * FROM held ORDER BY job_id OFFSET 0) held
    CROSS JOIN LATERAL (
        SELECT j.project_id FROM jobs_job j
        WHERE j.id = held.job_id AND j.status <> ALL(%(finished)s)
          AND j.cancel_requested_at IS NULL AND j.parent_id IS NULL
        FOR UPDATE
    ) j
), {completed_runs}, dropped AS (
    DELETE FROM jobs_queuetask q
    WHERE q.stage_run_id = ANY(ARRAY(SELECT id FROM run))
), activity AS (
    INSERT INTO omniva_activity (at, kind, project_id, job_id, data)
    SELECT %(now)s, 'stage:update', target.project_id, run.job_id, {stage_payload}
    FROM run JOIN target ON target.run_id = run.id
)
SELECT run.id, run.job_id FROM run
""")

# 2. The jobs whose runs completed, and each one's runs (see the module on why this is a
# statement of its own).
RUNS_OF_JOBS_SQL = """
SELECT j.id, j.pipeline, j.params, j.priority, r.id, r.name, r.status, r.progress, r.output
FROM unnest(%(jobs)s::uuid[]) AS g(job_id)
CROSS JOIN LATERAL (
    SELECT j.id, j.pipeline, j.params, j.priority FROM jobs_job j
    WHERE j.id = g.job_id LIMIT 1
) j
CROSS JOIN LATERAL (
    SELECT r.id, r.name, r.status, r.progress, r.output FROM jobs_stagerun r
    WHERE r.job_id = g.job_id OFFSET 0
) r
"""

# 3. What follows: the children queued (each with its task and `stage:update`), the
# progress of the jobs that go on (`job:progress`), the jobs that completed
# (`job:update`, and the job-done NOTIFY for those someone waits on).
STEP_WRITES_SQL = """
WITH queued AS (
    UPDATE jobs_stagerun r
    SET status = %(queued)s, queued_at = %(now)s, lease_token = NULL, lease_expires_at = NULL
    WHERE r.id = ANY(%(queue_runs)s::bigint[]) AND r.status = %(waiting)s
    RETURNING r.*
), tasks AS (
    INSERT INTO jobs_queuetask (queue, priority, payload, visible_at, deliveries,
                                stage_run_id, created_at)
    SELECT g.queue, g.priority, g.payload, statement_timestamp(), 0, g.run_id,
           statement_timestamp()
    FROM unnest(%(queue_runs)s::bigint[], %(queues)s::text[], %(priorities)s::int[],
                %(payloads)s::text[]) AS g(run_id, queue, priority, payload)
    WHERE g.run_id = ANY(ARRAY(SELECT id FROM queued))
    RETURNING queue
), progressed AS (
    UPDATE jobs_job j SET progress = g.progress, updated_at = %(now)s
    FROM unnest(%(progress_jobs)s::uuid[], %(progress)s::float8[]) AS g(job_id, progress)
    WHERE j.id = ANY(%(progress_jobs)s::uuid[]) AND j.id = g.job_id
    RETURNING j.*
), completed AS (
    UPDATE jobs_job j
    SET status = %(completed)s, result = g.result::jsonb, error = NULL, progress = 100,
        finished_at = %(now)s, next_attempt_at = NULL, updated_at = %(now)s
    FROM unnest(%(done_jobs)s::uuid[], %(results)s::text[]) AS g(job_id, result)
    WHERE j.id = ANY(%(done_jobs)s::uuid[]) AND j.id = g.job_id
    RETURNING j.*
), activity AS (
    INSERT INTO omniva_activity (at, kind, project_id, job_id, data)
    SELECT %(now)s, 'stage:update', j.project_id, queued.job_id, {queued_payload}
    FROM queued
    CROSS JOIN LATERAL (
        SELECT j.project_id FROM jobs_job j WHERE j.id = queued.job_id LIMIT 1
    ) j
    UNION ALL
    SELECT %(now)s, 'job:progress', progressed.project_id, progressed.id, {progressed_payload}
    FROM progressed
    UNION ALL
    SELECT %(now)s, 'job:update', completed.project_id, completed.id, {completed_payload}
    FROM completed
)
SELECT pg_notify(%(queue_prefix)s || queue, '') FROM (SELECT DISTINCT queue FROM tasks) t
UNION ALL
SELECT pg_notify(%(done_channel)s, completed.id::text) FROM completed WHERE completed.awaited
UNION ALL
SELECT pg_notify(%(activity_channel)s, '')
"""
for _alias, _fields in (
    ("queued", STAGE_FIELDS),
    ("progressed", JOB_FIELDS),
    ("completed", JOB_FIELDS),
):
    STEP_WRITES_SQL = STEP_WRITES_SQL.replace(f"{{{_alias}_payload}}", payload_sql(_alias, _fields))


@dataclass
class _JobRuns:
    """A job of the batch as RUNS_OF_JOBS_SQL read it."""

    pipeline: str
    params: dict[str, Any]
    priority: int
    runs: dict[str, tuple[int, str, float, Any]] = field(default_factory=dict)  # name: row


@dataclass
class _Step:
    """What STEP_WRITES_SQL writes (see the module)."""

    queue_runs: list[int] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    priorities: list[int] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)
    progress_jobs: list[Any] = field(default_factory=list)
    progress: list[float] = field(default_factory=list)
    done_jobs: list[Any] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    engine_children: list[tuple[Any, int]] = field(default_factory=list)  # (job id, run id)

    def queue(self, *, run_id: int, job_id: Any, job: _JobRuns, stage: Any, name: str) -> None:
        if stage.engine_type:
            self.engine_children.append((job_id, run_id))
            return
        self.queue_runs.append(run_id)
        self.queues.append(stage.queue)
        self.priorities.append(job.priority)
        self.payloads.append(
            stage_task(run_id=run_id, pipeline=job.pipeline, stage=name, queue=stage.queue)
        )


def stages_complete_dag(completions: Sequence[Completion]) -> set[int]:
    """Complete many stages of many-stage pipelines (see the module), in the caller's
    transaction: the ids of the runs completed; the others are for stage_complete to
    decide. What JSON cannot hold raises before anything is written."""
    if not completions:
        return set()
    now = timezone.now()
    outputs = [json.dumps(c.output, allow_nan=False) for c in completions]
    with prepared_cursor() as cursor:
        cursor.execute(
            COMPLETE_DAG_STAGES_SQL,
            {
                "runs": [c.stage_run_id for c in completions],
                "tokens": [c.token for c in completions],
                "outputs": outputs,
                "running": StageStatus.RUNNING,
                "completed": StageStatus.COMPLETED,
                "finished": list(FINISHED_STATUSES),
                "now": now,
            },
        )
        done = cursor.fetchall()
        if not done:
            return set()
        cursor.execute(RUNS_OF_JOBS_SQL, {"jobs": sorted({job_id for _, job_id in done})})
        jobs: dict[Any, _JobRuns] = {}
        for job_id, pipeline, params, priority, *run in cursor.fetchall():
            job = jobs.setdefault(job_id, _JobRuns(pipeline, json_column(params), priority))
            run_id, name, status, progress, output = run
            job.runs[name] = (run_id, status, progress, output)
        step = _next_steps(jobs, completed={run_id for run_id, _ in done})
        cursor.execute(STEP_WRITES_SQL, _step_params(step, now))
    for job_id, run_id in step.engine_children:
        job_row = Job.objects.get(pk=job_id)
        run_row = StageRun.objects.get(pk=run_id)
        stage = pipeline_named(job_row.pipeline).dag(job_row.params).stage(run_row.name)
        _enqueue_stage(job_row, run_row, stage)
    return {run_id for run_id, _ in done}


def _next_steps(jobs: dict[Any, _JobRuns], *, completed: set[int]) -> _Step:
    """What follows the completions `completed` in each of `jobs` (as stage_complete
    decides it): the job's result once every stage completed, else each waiting child
    whose parents all completed, queued, and the job's progress."""
    step = _Step()
    for job_id, job in jobs.items():
        definition = pipeline_named(job.pipeline)
        dag = definition.dag(job.params)
        runs = job.runs
        if all(status == StageStatus.COMPLETED for _, status, _, _ in runs.values()):
            outputs = {name: output for name, (_, _, _, output) in runs.items()}
            result = definition.result({k: json_column(v) for k, v in outputs.items()}, dag)
            step.done_jobs.append(job_id)
            step.results.append(json.dumps(result, cls=DjangoJSONEncoder))
            continue
        ended = [name for name, (run_id, _, _, _) in runs.items() if run_id in completed]
        ready = {
            child
            for name in ended
            for child in dag.children(name)
            if runs[child][1] == StageStatus.WAITING
            and all(runs[p][1] == StageStatus.COMPLETED for p in dag.stage(child).depends_on)
        }
        for child in sorted(ready, key=dag.order.index):
            step.queue(
                run_id=runs[child][0], job_id=job_id, job=job, stage=dag.stage(child), name=child
            )
        step.progress_jobs.append(job_id)
        step.progress.append(round(sum(p for _, _, p, _ in runs.values()) / len(runs), 2))
    return step


def _step_params(step: _Step, now: datetime) -> dict[str, Any]:
    return {
        "queue_runs": step.queue_runs,
        "queues": step.queues,
        "priorities": step.priorities,
        "payloads": step.payloads,
        "progress_jobs": step.progress_jobs,
        "progress": step.progress,
        "done_jobs": step.done_jobs,
        "results": step.results,
        "queued": StageStatus.QUEUED,
        "waiting": StageStatus.WAITING,
        "completed": StageStatus.COMPLETED,
        "now": now,
        "queue_prefix": broker.channel_for(""),
        "done_channel": JOB_DONE_CHANNEL,
        "activity_channel": ACTIVITY_CHANNEL,
    }
