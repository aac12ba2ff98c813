"""The one-statement transitions the worker runtime batches: the start of every granted
attempt, the heartbeat of every held one, the completion of sole stages. Each does in
SQL what its Python transition does under the same rules (attempts.py).

Plans that do not depend on statistics. These statements run prepared with generic
plans (omniva/prepared.py), planned once per connection from the statistics of that
moment. Statistics taken while a table held only dead rows (an ANALYZE after a purge,
or of a queue that had just drained) say it is empty, and an empty table's full scan
looks free: a completion planned then scanned every job for each batch (6,000 jobs: 30
ms a statement instead of 1, and the drain at a sixth of its rate until the next
ANALYZE). So no statement here leaves the planner a plan whose cost grows with a
table: each row is reached from the batch's ids, through a LATERAL subquery that takes
one row by its primary key (a subquery with FOR UPDATE or LIMIT is never flattened
into the join, so it is run once per id, by the index), and each UPDATE is given its
rows by `= ANY(ARRAY(...))` of ids. tests/jobs/test_plan_bounds.py runs them against
statistics that say empty and counts the rows each plan node touches.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs import broker
from jobs.models import (
    FINISHED_STATUSES,
    JOB_DONE_CHANNEL,
    StageStatus,
)
from jobs.pipelines import registry as pipelines
from jobs.services.activity import JOB_FIELDS, STAGE_FIELDS, payload_sql
from jobs.services.core import (
    StageClaim,
    SupervisionState,
    _lease_until,
    _parent_outputs,
    json_column,
    pipeline_named,
    stage_task,
)
from omniva.models import ACTIVITY_CHANNEL
from omniva.prepared import prepared_cursor

# Whether job `j` lets a queued stage start under the common rules: it is neither
# finished, cancelled nor out of time (stage_start has the full rules).
_JOB_STARTABLE = """j.status <> ALL(%(finished)s) AND j.cancel_requested_at IS NULL
          AND (j.started_at IS NOT NULL OR COALESCE(j.queue_timeout_s, 0) = 0
               OR j.pending_since IS NULL
               OR %(now)s <= j.pending_since + make_interval(secs => j.queue_timeout_s))
          AND (COALESCE(j.timeout_s, 0) = 0 OR j.started_at IS NULL
               OR %(now)s < j.started_at + make_interval(secs => j.timeout_s))"""

# The queued run of each id in `{ids}` (a relation with a `run_id` column), with its job
# id: one primary-key lookup per id (see the module on plans).
_QUEUED_RUNS = """SELECT r.id AS run_id, r.job_id
    FROM {ids}
    CROSS JOIN LATERAL (
        SELECT r.id, r.job_id FROM jobs_stagerun r
        WHERE r.id = {ids}.run_id AND r.status = %(queued)s
        LIMIT 1
    ) r"""

# The start of the runs in `target` (run_id, job_id; their jobs' rows locked by it):
# each run, its job (once, however many of its runs start) and their activity rows. The
# run is only changed while its status is still `queued`, re-checked on the newest row
# version once the job's lock is held.
_START_WRITES = """run AS (
    UPDATE jobs_stagerun r
    SET status = %(running)s, attempt = r.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = %(lease)s, worker = %(worker)s, started_at = %(now)s,
        finished_at = NULL, progress = 0, error = NULL
    WHERE r.id = ANY(ARRAY(SELECT run_id FROM target)) AND r.status = %(queued)s
    RETURNING r.*
), job AS (
    UPDATE jobs_job j
    SET status = %(running)s, attempts = GREATEST(j.attempts, started.attempt),
        next_attempt_at = NULL, started_at = COALESCE(j.started_at, %(now)s),
        updated_at = %(now)s
    FROM (SELECT job_id, max(attempt) AS attempt FROM run GROUP BY job_id) started
    WHERE j.id = ANY(ARRAY(SELECT job_id FROM run)) AND j.id = started.job_id
    RETURNING j.*
), activity AS (
    INSERT INTO omniva_activity (at, kind, project_id, job_id, data)
    SELECT %(now)s, 'job:update', job.project_id, job.id,
        {job_payload}
    FROM job
    UNION ALL
    SELECT %(now)s, 'stage:update', job.project_id, job.id,
        {stage_payload}
    FROM job JOIN run ON run.job_id = job.id
)"""

# What a started run's worker needs (StageClaim), in this order.
_GRANT_COLUMNS = """run.id, run.lease_token, job.id, job.pipeline, job.params, job.started_at,
       job.timeout_s, run.name, run.attempt"""


# The completions given (run, token, output) and the runs whose tokens still hold, each
# found by its key: `given` and `held` of the completion statements (here and
# dag_completion.py).
_HELD_RUNS = """given AS (
    SELECT * FROM unnest(%(runs)s::bigint[], %(tokens)s::uuid[], %(outputs)s::text[])
           AS g(run_id, token, output)
), held AS MATERIALIZED (
    SELECT r.id AS run_id, r.job_id
    FROM given
    CROSS JOIN LATERAL (
        SELECT r.id, r.job_id FROM jobs_stagerun r
        WHERE r.id = given.run_id AND r.lease_token = given.token AND r.status = %(running)s
        LIMIT 1
    ) r
)"""

# The completion of the runs of `target` (run_id) whose tokens still hold on the newest
# row version, once their jobs are locked: `run`, their rows as completed.
_COMPLETED_RUNS = """run AS (
    UPDATE jobs_stagerun r
    SET status = %(completed)s, output = g.output::jsonb, progress = 100,
        finished_at = %(now)s, lease_token = NULL, lease_expires_at = NULL, error = NULL
    FROM given g
    WHERE r.id = ANY(ARRAY(SELECT run_id FROM target)) AND g.run_id = r.id
      AND r.status = %(running)s AND r.lease_token = g.token
    RETURNING r.*
)"""


def _with_payloads(sql: str) -> str:
    """`sql` with the shared parts of the start statements in place, and its activity
    payloads built from the field lists (activity.py)."""
    for name, part in (
        ("{job_startable}", _JOB_STARTABLE),
        ("{start_writes}", _START_WRITES),
        ("{grant_columns}", _GRANT_COLUMNS),
        ("{claim_pick}", broker.CLAIM_PICK),
        ("{held_runs}", _HELD_RUNS),
        ("{completed_runs}", _COMPLETED_RUNS),
    ):
        sql = sql.replace(name, part)
    sql = sql.replace("{queued_runs_of_claimed}", _QUEUED_RUNS.format(ids="claimed"))
    sql = sql.replace("{queued_runs_of_given}", _QUEUED_RUNS.format(ids="given"))
    return sql.replace("{job_payload}", payload_sql("job", JOB_FIELDS)).replace(
        "{stage_payload}", payload_sql("run", STAGE_FIELDS)
    )


# The common case of a start in one statement, for runs whose deliveries a worker holds:
# a run starts only by a delivery whose queue row is still there as delivered (a row
# that ended with an earlier attempt, dropped with it, or was delivered again since
# starts nothing). It locks the job row first like every transition. When any of that
# does not hold it changes nothing, and stage_start decides under the full rules.
START_SQL = _with_payloads("""
WITH given AS (
    SELECT * FROM unnest(%(runs)s::bigint[], %(rows)s::bigint[], %(deliveries)s::int[])
           AS g(run_id, row_id, deliveries)
    WHERE g.row_id IS NULL OR EXISTS (
        SELECT 1 FROM jobs_queuetask q WHERE q.id = g.row_id AND q.deliveries = g.deliveries)
), queued AS MATERIALIZED (
    {queued_runs_of_given}
), target AS (
    -- the jobs locked one by one in the order of their ids (the order every
    -- transition that locks several jobs takes)
    SELECT queued.run_id, queued.job_id
    FROM (SELECT * FROM queued ORDER BY job_id OFFSET 0) queued
    CROSS JOIN LATERAL (
        SELECT 1 FROM jobs_job j
        WHERE j.id = queued.job_id AND {job_startable}
        FOR UPDATE
    ) j
), {start_writes}
SELECT {grant_columns}, pg_notify(%(activity_channel)s, '')
FROM job JOIN run ON run.job_id = job.id
""")


# The broker's claim and the starts of the claimed stages in one statement (River's
# shape): up to `limit` ready tasks of a queue are claimed as CLAIM_SQL claims them
# (jobs/broker.py), and the stage run of each that starts under the common rules is
# started as START_SQL starts it. Tasks fetched ahead of the workers start too (as
# River's do): when the whole cluster dies holding them, they run again after their
# lease and count an attempt (at most `queue_limit` and one per worker; a cluster that
# stops on its own puts its stash back uncounted, PostgresBroker.stash_give_back);
# starting those in their workers instead sent nearly every start back to one
# statement per task (452 jobs/s instead of 744). A job row locked by another
# transaction is skipped, not waited for (SKIP LOCKED: a claim never waits, so
# it cannot deadlock with a transition that holds the job and drops its queue rows);
# its task is delivered without a start and stage_start decides. Every row is reached
# by its key, whatever the limit and the statistics (see the module on plans).
CLAIM_START_SQL = _with_payloads("""
WITH {claim_pick}, claimed AS (
    UPDATE jobs_queuetask q
    SET visible_at = statement_timestamp() + make_interval(secs => %(lease_s)s),
        deliveries = q.deliveries + 1
    WHERE q.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING q.id, q.deliveries, q.priority, q.payload, q.stage_run_id AS run_id
), queued AS (
    {queued_runs_of_claimed}
), target AS (
    SELECT queued.run_id, queued.job_id
    FROM queued
    CROSS JOIN LATERAL (
        SELECT 1 FROM jobs_job j
        WHERE j.id = queued.job_id AND {job_startable}
        FOR UPDATE SKIP LOCKED
    ) j
), {start_writes}
SELECT claimed.id, claimed.deliveries, claimed.priority, claimed.payload, {grant_columns},
       CASE WHEN run.id IS NOT NULL THEN pg_notify(%(activity_channel)s, '') END,
       -- the outputs of the job's completed stages: the started stage's inputs are among
       -- them (its parents completed before it was queued), so its worker need not
       -- read them (a round trip on the worker's path for every stage of a DAG)
       CASE WHEN run.id IS NOT NULL THEN (
           SELECT jsonb_object_agg(p.name, p.output) FROM jobs_stagerun p
           WHERE p.job_id = run.job_id AND p.status = %(completed)s
       ) END
FROM claimed LEFT JOIN run ON run.id = claimed.run_id
LEFT JOIN job ON job.id = run.job_id
""")


def _start_params(now: datetime, worker: str) -> dict[str, Any]:
    return {
        "queued": StageStatus.QUEUED,
        "running": StageStatus.RUNNING,
        "finished": list(FINISHED_STATUSES),
        "now": now,
        "lease": _lease_until(now),
        "worker": worker[:200],
        "activity_channel": ACTIVITY_CHANNEL,
    }


def _grant_fields(row: Sequence[Any]) -> dict[str, Any]:
    """What a worker needs of a started run (StageClaim's fields but its inputs and
    delivery), from its _GRANT_COLUMNS."""
    run_id, token, job_id, pipeline, params, started_at, timeout_s, stage, attempt = row
    return {
        "stage_run_id": run_id,
        "job_id": str(job_id),
        "pipeline": pipeline,
        "stage": stage,
        "attempt": attempt,
        "token": str(token),
        "params": json_column(params),
        "deadline": started_at + timedelta(seconds=timeout_s) if timeout_s else None,
    }


def _grant(row: Sequence[Any], ack_id: str | None) -> StageClaim:
    """The StageClaim of a started run from its _GRANT_COLUMNS."""
    return stage_granted(grant=_grant_fields(row), ack_id=ack_id)


def tasks_claim_starting(
    conn: psycopg.Connection[Any],
    *,
    queue: str,
    limit: int,
    lease_s: float,
    worker: str,
) -> list[broker.ClaimedTask]:
    """The broker's claim on its own connection `conn`, starting the stages of the tasks
    it claims (CLAIM_START_SQL): ack id, payload and priority of each task, in priority then age
    order. The payload of a task whose stage started carries its
    grant (`run_stage`'s `grant`), so its worker runs it without a start of its own; the
    others start in the worker."""
    now = timezone.now()
    with conn.cursor() as cursor:
        cursor.execute(
            CLAIM_START_SQL,
            {
                **_start_params(now, worker),
                "queue": queue,
                "limit": limit,
                "lease_s": lease_s,
                "completed": StageStatus.COMPLETED,
            },
            prepare=True,
        )
        rows = cursor.fetchall()
    # RETURNING does not keep the pick's order: restore priority, then age.
    rows.sort(key=lambda row: (-row[2], row[0]))
    tasks = []
    for row in rows:
        row_id, deliveries, priority, payload, *granted = row
        if granted[0] is not None:
            # The stage's task as core.stage_task writes it (the pusher's time goes into
            # signing: a new task is cheaper than the stored one unpacked and changed).
            grant = _grant_fields(granted[:9])
            outputs = json_column(granted[10])
            if outputs:
                grant["outputs"] = outputs
            payload = stage_task(
                run_id=grant["stage_run_id"],
                pipeline=grant["pipeline"],
                stage=grant["stage"],
                queue=queue,
                grant=grant,
            )
        tasks.append(broker.ClaimedTask(broker.ack_id_for(row_id, deliveries), payload, priority))
    return tasks


def stage_granted(*, grant: dict[str, Any], ack_id: str | None) -> StageClaim:
    """The claim of a stage started by the broker's claim (tasks_claim_starting), its
    inputs taken from the outputs the claim read with it, or else read now."""
    grant = dict(grant)
    outputs = grant.pop("outputs", None)
    if outputs is None:
        inputs = _parent_outputs(
            grant["job_id"], grant["pipeline"], grant["params"], grant["stage"]
        )
    else:
        dag = pipeline_named(grant["pipeline"]).dag(grant["params"])
        inputs = {p: outputs[p] for p in dag.stage(grant["stage"]).depends_on if p in outputs}
    return StageClaim(**grant, inputs=inputs, ack_id=ack_id)


def stages_start_granted(*, ack_ids: dict[int, str | None], worker: str) -> list[StageClaim]:
    """The common starts of many stage runs (`ack_ids`: run id -> its delivery) in one
    statement (START_SQL); the runs it did not start are for stage_start to decide."""
    if not ack_ids:
        return []
    deliveries = [broker.parse_ack_id(ack) if ack else (None, None) for ack in ack_ids.values()]
    with prepared_cursor() as cursor:
        cursor.execute(
            START_SQL,
            {
                **_start_params(timezone.now(), worker),
                "runs": list(ack_ids),
                "rows": [row for row, _ in deliveries],
                "deliveries": [count for _, count in deliveries],
            },
        )
        rows = cursor.fetchall()
    return [_grant(row[:9], ack_ids[row[0]]) for row in rows]


# The heartbeat of running attempts (one, or a gpu batch's), one statement: the leases
# of those whose tokens still hold are extended, and their jobs' state returned. It
# names the worker process that runs them (a start in the broker's claim names the
# cluster that claimed: which of its workers takes the task is not known then).
HEARTBEAT_SQL = """
WITH held AS (
    UPDATE jobs_stagerun r SET lease_expires_at = %(lease)s, worker = %(worker)s
    FROM unnest(%(runs)s::bigint[], %(tokens)s::uuid[]) AS g(run_id, token)
    WHERE r.id = ANY(%(runs)s) AND r.id = g.run_id AND r.lease_token = g.token
      AND r.status = %(running)s
    RETURNING r.id, r.job_id
)
SELECT held.id, j.status, j.cancel_requested_at, j.started_at, j.timeout_s
FROM held
CROSS JOIN LATERAL (
    SELECT j.status, j.cancel_requested_at, j.started_at, j.timeout_s
    FROM jobs_job j WHERE j.id = held.job_id LIMIT 1
) j
"""


def stages_heartbeat(*, claims: list[StageClaim], worker: str) -> dict[int, SupervisionState]:
    """The heartbeat of running attempts (a gpu batch's, while its forward pass runs):
    their leases and their queue rows' extended, one statement each, and what each one's
    job asks (a cancel, its deadline), by stage run id; an attempt whose token no longer
    holds is absent."""
    if not claims:
        return {}
    now = timezone.now()
    with transaction.atomic():
        with prepared_cursor() as cursor:
            cursor.execute(
                HEARTBEAT_SQL,
                {
                    "lease": _lease_until(now),
                    "runs": [claim.stage_run_id for claim in claims],
                    "tokens": [claim.token for claim in claims],
                    "running": StageStatus.RUNNING,
                    "worker": worker[:200],
                },
            )
            rows = cursor.fetchall()
        broker.extend_leases(
            ack_ids=[claim.ack_id for claim in claims if claim.ack_id],
            lease_s=settings.OMNIVA_TASK_LEASE_S,
        )
    return {
        run_id: SupervisionState(
            lease_held=status not in FINISHED_STATUSES,
            cancel_requested_at=cancel_requested_at,
            deadline=started_at + timedelta(seconds=timeout_s)
            if timeout_s and started_at
            else None,
        )
        for run_id, status, cancel_requested_at, started_at, timeout_s in rows
    }


# The common completion in one statement: the only stage of a one-stage pipeline
# (pipelines.single_stage_pipelines) completes with its job, its queue rows are dropped
# and the job-done NOTIFY sent. Under the job's row lock like every
# transition, and only while the attempt's token holds; otherwise it changes nothing and
# stage_complete decides under the full rules (cancel requested, batch parent, DAGs).
COMPLETE_SOLE_STAGE_SQL = _with_payloads("""
WITH {held_runs}, target AS (
    -- the jobs locked one by one in the order of their ids (see START_SQL)
    SELECT held.run_id, held.job_id
    FROM (SELECT * FROM held ORDER BY job_id OFFSET 0) held
    CROSS JOIN LATERAL (
        SELECT 1 FROM jobs_job j
        WHERE j.id = held.job_id AND j.status <> ALL(%(finished)s)
          AND j.cancel_requested_at IS NULL AND j.parent_id IS NULL
          AND j.pipeline = ANY(%(pipelines)s)
        FOR UPDATE
    ) j
), {completed_runs}, dropped AS (
    DELETE FROM jobs_queuetask q USING run
    WHERE q.stage_run_id = ANY(ARRAY(SELECT id FROM run)) AND q.stage_run_id = run.id
), job AS (
    UPDATE jobs_job j
    SET status = %(completed)s, result = run.output, error = NULL, progress = 100,
        finished_at = %(now)s, next_attempt_at = NULL, updated_at = %(now)s
    FROM run
    WHERE j.id = ANY(ARRAY(SELECT job_id FROM run)) AND j.id = run.job_id
    RETURNING j.*
), activity AS (
    INSERT INTO omniva_activity (at, kind, project_id, job_id, data)
    SELECT %(now)s, 'stage:update', job.project_id, job.id,
        {stage_payload}
    FROM job JOIN run ON run.job_id = job.id
    UNION ALL
    SELECT %(now)s, 'job:update', job.project_id, job.id,
        {job_payload}
    FROM job
)
SELECT run.id, CASE WHEN job.awaited THEN pg_notify(%(channel)s, job.id::text) END,
       pg_notify(%(activity_channel)s, '')
FROM job JOIN run ON run.job_id = job.id
""")


@dataclass(frozen=True)
class Completion:
    stage_run_id: int
    token: str
    output: Any


def stages_complete_sole(completions: list[Completion]) -> set[int]:
    """Complete many one-stage jobs with their stage in one statement
    (COMPLETE_SOLE_STAGE_SQL): the ids of the runs it completed; the others are for
    stage_complete to decide. What JSON cannot hold raises before anything is written."""
    if not completions:
        return set()
    with prepared_cursor() as cursor:
        cursor.execute(
            COMPLETE_SOLE_STAGE_SQL,
            {
                "runs": [c.stage_run_id for c in completions],
                "tokens": [c.token for c in completions],
                "outputs": [json.dumps(c.output, allow_nan=False) for c in completions],
                "running": StageStatus.RUNNING,
                "completed": StageStatus.COMPLETED,
                "finished": list(FINISHED_STATUSES),
                "pipelines": pipelines.single_stage_pipelines(),
                "now": timezone.now(),
                "channel": JOB_DONE_CHANNEL,
                "activity_channel": ACTIVITY_CHANNEL,
            },
        )
        return {row[0] for row in cursor.fetchall()}
