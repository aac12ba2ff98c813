"""Our django-q2 broker on PostgreSQL (`Q_CLUSTER["broker_class"]`).

One table, `jobs_queuetask` (jobs.models.QueueTask), indexed on (queue, priority desc,
id). A claim is one statement: it picks the ready rows of a queue in priority then age
order with FOR UPDATE SKIP LOCKED, so concurrent pushers never block on or take the same
row, and moves their `visible_at` forward by the lease. The acknowledgement deletes the
row, fenced by the delivery count, so a worker whose lease ran out and whose row was
delivered again cannot delete the newer delivery. A row whose lease runs out is simply
ready again: redelivery needs no sweeper.

An idle pusher waits on LISTEN `omniva_queue_<queue>`; every enqueue NOTIFYs in its own
transaction, so the wake-up arrives when the task becomes visible to the claim. A slow
poll (one second, or sooner when a delayed task comes due) is only a fallback. The
connection listens only while the pusher waits: it LISTENs, claims once more (a task
enqueued before the LISTEN took effect), waits, then UNLISTENs and reads what else
came. A session that listens and does not read holds up PostgreSQL's one notification
queue for every session: once that queue is full (8 GB), every commit that notifies
fails; so neither the pusher while it is busy nor any other connection of the broker
(the sentinel's ping, the monitor's acknowledgements) listens. A lost connection (a
database restart) is opened again by the next dequeue; the log says when it was lost
and when it came back.

The pusher fetches by demand (jobs/fetching.py): a task for each worker waiting for one,
and, while tasks are short, a few claimed ahead in its Stash, which a task that outranks
them passes; so an urgent task enqueued behind a backlog of long stages is the next one
any worker starts, not the one after a buffer's worth of them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from multiprocessing import util as mp_util
from typing import Any, LiteralString

import psycopg
from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django_q.brokers import Broker
from django_q.conf import Conf

from jobs import fetching
from jobs.fetching import AHEAD_BUDGET_S, ClaimedTask, Stash
from omniva.notifications import own_connection_params

logger = logging.getLogger("omniva.broker")

FALLBACK_POLL_S = 1.0
RECONNECT_PAUSE_S = 0.5

# The rows are picked once, in a MATERIALIZED CTE: as `WHERE id IN (subquery)` the
# planner may run the subquery again for the update (a semi-join rescan), and each run
# takes up to LIMIT more rows, so one claim took rows no one was handed (seen in tests).
# `= ANY(ARRAY(…))` keeps the update on the primary key in a generic plan, which cannot
# know how small LIMIT is (a join on the CTE was planned as a scan of the whole table).
CLAIM_PICK = """picked AS MATERIALIZED (
    SELECT id FROM jobs_queuetask
    WHERE queue = %(queue)s AND visible_at <= statement_timestamp()
    ORDER BY priority DESC, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)"""
# The priority of the queue's next ready task (the claim's pick, without the claim).
TOP_PRIORITY_SQL = """
SELECT priority FROM jobs_queuetask
WHERE queue = %(queue)s AND visible_at <= statement_timestamp()
ORDER BY priority DESC, id
LIMIT 1
"""
CLAIM_SQL = f"""
WITH {CLAIM_PICK}
UPDATE jobs_queuetask q
SET visible_at = statement_timestamp() + make_interval(secs => %(lease)s),
    deliveries = q.deliveries + 1
WHERE q.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING q.id, q.deliveries, q.priority, q.payload
"""  # noqa: S608 (constants)


# A claim that also starts what it claims (jobs.services.tasks_claim_starting, set by
# jobs.apps at start: services build on the broker, not the reverse): called with the
# broker's connection, queue, limit, lease and the name of the cluster that claims.
ClaimStarting = Callable[..., list[ClaimedTask]]
_claim_starting: list[ClaimStarting] = []
# What puts back the tasks (ack id, payload) such a claim claimed and started that a
# stopping pusher never handed out (jobs.services.tasks_give_back).
GiveBack = Callable[[list[tuple[str, str]]], None]
_give_back: list[GiveBack] = []


def claim_with_starts(claim: ClaimStarting, *, give_back: GiveBack) -> None:
    """Make `claim` the broker's claim (see ClaimStarting), and `give_back` what puts
    back the tasks it started that a stopping pusher holds (PostgresBroker.stash_give_back)."""
    _claim_starting[:] = [claim]
    _give_back[:] = [give_back]


def cluster_name() -> str:
    """Who started a stage in a claim: the host and the cluster (its sentinel, the
    parent of the pusher and of every worker)."""
    return f"{socket.gethostname()}:{os.getppid()}"


# One task row of an INSERT (enqueue_values); a statement may carry several.
ENQUEUE_VALUES = (
    "(%s, %s, %s, statement_timestamp() + make_interval(secs => %s), 0, %s, statement_timestamp())"
)
ENQUEUE_COLUMNS = "queue, priority, payload, visible_at, deliveries, stage_run_id, created_at"

# The INSERT and its NOTIFY in one round trip; the notification is delivered at commit.
ENQUEUE_SQL = f"""
WITH task AS (
    INSERT INTO jobs_queuetask ({ENQUEUE_COLUMNS}) VALUES {ENQUEUE_VALUES}
    RETURNING id
)
SELECT id, pg_notify(%s, '') FROM task
"""  # noqa: S608 (constants)


# The gpu worker's micro-batches (jobs/pipelines/lib/inference.py): ready rows of `queue`
# whose stage runs are of the given (pipeline, stage) pairs, claimed like CLAIM_SQL claims.
CLAIM_STAGES_SQL = """
WITH picked AS MATERIALIZED (
    SELECT q.id FROM jobs_queuetask q
    JOIN jobs_stagerun r ON r.id = q.stage_run_id
    JOIN jobs_job j ON j.id = r.job_id
    WHERE q.queue = %(queue)s AND q.visible_at <= statement_timestamp()
      AND j.pipeline || '.' || r.name = ANY(%(stages)s)
    ORDER BY q.priority DESC, q.id
    LIMIT %(limit)s
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE jobs_queuetask q
SET visible_at = statement_timestamp() + make_interval(secs => %(lease)s),
    deliveries = q.deliveries + 1
FROM picked
WHERE q.id = picked.id
RETURNING q.id, q.deliveries, q.stage_run_id
"""


def channel_for(queue: str) -> str:
    return f"omniva_queue_{queue}"


def task_lease_s() -> float:
    return float(settings.OMNIVA_TASK_LEASE_S)


def enqueue_values(
    *,
    queue: str,
    payload: str,
    priority: int = 5,
    delay_s: float = 0.0,
    stage_run_id: int | None = None,
) -> list[Any]:
    """The parameters of one ENQUEUE_VALUES row."""
    return [queue, priority, payload, delay_s, stage_run_id]


def enqueue_payload(
    *,
    queue: str,
    payload: str,
    priority: int = 5,
    delay_s: float = 0.0,
    stage_run_id: int | None = None,
) -> int:
    """Insert a task row in the caller's transaction; its NOTIFY is delivered at commit."""
    values = enqueue_values(
        queue=queue, payload=payload, priority=priority, delay_s=delay_s,
        stage_run_id=stage_run_id,
    )  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(ENQUEUE_SQL, [*values, channel_for(queue)])
        return cursor.fetchone()[0]


def ack_id_for(row_id: int, deliveries: int) -> str:
    return f"{row_id}:{deliveries}"


def parse_ack_id(ack_id: str) -> tuple[int, int]:
    row_id, deliveries = str(ack_id).split(":", 1)
    return int(row_id), int(deliveries)


def extend_lease(*, ack_id: str, lease_s: float) -> bool:
    """Keep a delivered row invisible while its task runs; False when it was delivered anew."""
    return extend_leases(ack_ids=[ack_id], lease_s=lease_s) == 1


def extend_leases(*, ack_ids: list[str], lease_s: float) -> int:
    """`extend_lease` for several deliveries in one statement; how many still held."""
    if not ack_ids:
        return 0
    rows, deliveries = zip(*(parse_ack_id(ack_id) for ack_id in ack_ids), strict=True)
    with connection.cursor() as cursor:
        # q.id = ANY: the rows are reached by their key whatever the statistics say
        # (jobs/services/fastpath.py, "Plans that do not depend on statistics").
        cursor.execute(
            "UPDATE jobs_queuetask q "
            "SET visible_at = statement_timestamp() + make_interval(secs => %s) "
            "FROM unnest(%s::bigint[], %s::int[]) AS held(id, deliveries) "
            "WHERE q.id = ANY(%s) AND q.id = held.id AND q.deliveries = held.deliveries",
            [lease_s, list(rows), list(deliveries), list(rows)],
        )
        return cursor.rowcount


def defer_delivery(*, ack_id: str, until: Any) -> None:
    """Put a delivered row back, visible again at `until`, as a new delivery (so the
    acknowledgement that follows this task's return does not delete it)."""
    row_id, deliveries = parse_ack_id(ack_id)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE jobs_queuetask SET visible_at = %s, deliveries = deliveries + 1 "
            "WHERE id = %s AND deliveries = %s",
            [until, row_id, deliveries],
        )


def claim_stage_tasks(*, queue: str, stages: list[str], limit: int) -> list[tuple[str, int]]:
    """Claim up to `limit` ready tasks of `queue` that run one of `stages` ("pipeline.stage"):
    (ack id, stage run id) of each, in priority then age order."""
    with connection.cursor() as cursor:
        cursor.execute(
            CLAIM_STAGES_SQL,
            {"lease": task_lease_s(), "queue": queue, "stages": stages, "limit": limit},
        )
        return [(ack_id_for(row_id, deliveries), run_id) for row_id, deliveries, run_id in cursor]


def delivery_is_current(*, ack_id: str) -> bool:
    """The delivery's row is there and was not delivered again since."""
    row_id, deliveries = parse_ack_id(ack_id)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM jobs_queuetask WHERE id = %s AND deliveries = %s", [row_id, deliveries]
        )
        return cursor.fetchone() is not None


def acknowledge_delivery(*, ack_id: str) -> None:
    row_id, deliveries = parse_ack_id(ack_id)
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM jobs_queuetask WHERE id = %s AND deliveries = %s", [row_id, deliveries]
        )


def drop_stage_tasks(*, stage_run_ids: list[int]) -> int:
    """Delete the rows of stage runs that must not run (their job was cancelled or deleted)."""
    if not stage_run_ids:
        return 0
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM jobs_queuetask WHERE stage_run_id = ANY(%s)", [list(stage_run_ids)]
        )
        return cursor.rowcount


class PostgresBroker(Broker):
    """The Broker API of django-q2 over jobs_queuetask.

    The pusher and the monitor each run in their own process and each get a copy of
    this object; every process opens its own autocommit connection on first use.
    """

    def __init__(self, list_key: str | None = None) -> None:
        super().__init__(list_key=list_key)
        self._conn: psycopg.Connection | None = None
        self._conn_pid: int | None = None
        self._lost_at: float | None = None
        self._stash = Stash()
        self._looked_up_at = 0.0
        self._finalized_in: int | None = None

    def __getstate__(self) -> Any:
        return self.list_key, self._info

    def __setstate__(self, state: Any) -> None:
        self.list_key, self._info = state
        self.connection = self.get_connection(self.list_key)
        self.cache = self.get_cache()
        self._conn = None
        self._conn_pid = None
        self._lost_at = None
        self._stash = Stash()
        self._looked_up_at = 0.0
        self._finalized_in = None

    @staticmethod
    def get_connection(list_key: str | None = None) -> None:
        return None

    @property
    def queue(self) -> str:
        return self.list_key or Conf.CLUSTER_NAME

    # A connection of our own, not Django's: django-q2 closes Django's connections between
    # tasks, and the pusher's LISTEN must be on the session it waits on.
    def _db(self) -> psycopg.Connection:
        if self._conn is not None and self._conn_pid == os.getpid() and not self._conn.closed:
            return self._conn
        conn = psycopg.connect(**own_connection_params(), autocommit=True)
        # Claims and acknowledgements need not wait for the WAL flush: after a server
        # crash a lost claim or acknowledgement only means the task is delivered again,
        # and the stage's fencing makes that delivery a no-op. Enqueues and transitions
        # run on Django's connection and stay durable.
        conn.execute("SET synchronous_commit = off")
        # Its statements run prepared with generic plans (omniva/prepared.py), planned
        # once per session: a claim planned while the queue was empty (a VACUUM had just
        # found it so) scanned and sorted the whole table on every later claim until the
        # next ANALYZE (26 ms behind 10,000 tasks instead of 5). Every statement of the
        # broker goes by an index.
        conn.execute("SET enable_seqscan = off")
        self._conn, self._conn_pid = conn, os.getpid()
        if self._lost_at is not None:
            logger.info(
                "broker connection restored after %.1f s (queue %s)",
                time.monotonic() - self._lost_at,
                self.queue,
            )
            self._lost_at = None
        return conn

    def _reset(self, exc: Exception) -> None:
        logger.warning("broker connection lost (%s); reconnecting", exc.__class__.__name__)
        if self._conn is not None and self._conn_pid == os.getpid():
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        time.sleep(RECONNECT_PAUSE_S)

    def set_stat(self, key: str, value: str, timeout: int) -> Any:
        # The guard saves the cluster's status (what the `workers` health check reads) on
        # Django's connection every cycle, and django-q2 closes that connection only
        # before it fires schedules, every 30 s: after a database restart every report
        # failed on the dead connection until then, and the cluster looked gone. Drop a
        # connection an error left unusable, so the next cycle connects anew.
        try:
            return super().set_stat(key, value, timeout)
        except DatabaseError:
            close_old_connections()
            raise

    def info(self) -> str:
        if not self._info:
            self._info = "PostgreSQL (omniva)"
        return self._info

    def ping(self) -> bool:
        try:
            self._db().execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def enqueue(self, task: str) -> int:
        # Tasks that django-q2 enqueues itself (schedules, async_task): normal priority.
        return enqueue_payload(queue=self.queue, payload=task)

    def claim(self, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` ready tasks, (ack id, payload) in priority then age order; with a
        claim that starts (ClaimStarting), their stages start in the same statement."""
        return [(ack_id, payload) for ack_id, payload, _ in self._claim(limit)]

    def _claim(self, limit: int) -> list[ClaimedTask]:
        if _claim_starting:
            return _claim_starting[0](
                self._db(),
                queue=self.queue,
                limit=limit,
                lease_s=task_lease_s(),
                worker=cluster_name(),
            )
        rows = (
            self._db()
            .execute(CLAIM_SQL, {"lease": task_lease_s(), "queue": self.queue, "limit": limit})
            .fetchall()
        )
        # RETURNING does not keep the subquery's order: restore priority, then age.
        rows.sort(key=lambda row: (-row[2], row[0]))
        return [
            ClaimedTask(ack_id_for(row_id, deliveries), payload, priority)
            for row_id, deliveries, priority, payload in rows
        ]

    def _outranked(self, priority: int) -> bool:
        """A ready task of the queue has a higher priority than `priority`. Looked up at
        most once per AHEAD_BUDGET_S: once per task, the look-up cost no-op tasks a
        third of their rate."""
        now = time.monotonic()
        if now - self._looked_up_at < AHEAD_BUDGET_S:
            return False
        self._looked_up_at = now
        row = self._db().execute(TOP_PRIORITY_SQL, {"queue": self.queue}).fetchone()
        return row is not None and row[0] > priority

    def _seconds_until_next_due(self) -> float | None:
        row = (
            self._db()
            .execute(
                "SELECT EXTRACT(EPOCH FROM min(visible_at) - statement_timestamp()) "
                "FROM jobs_queuetask WHERE queue = %s",
                [self.queue],
            )
            .fetchone()
        )
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    def dequeue(self) -> list[tuple[str, str]] | None:
        # Called by the pusher in a loop that checks for the cluster's stop between calls:
        # with every worker busy it waits a fallback poll's time, then comes back empty.
        if self._finalized_in != os.getpid():
            # The pusher's loop ends when the cluster stops, and its process (a child of
            # the sentinel: multiprocessing runs its finalizers at its exit) ends.
            self._finalized_in = os.getpid()
            if multiprocessing.parent_process() is not None:
                mp_util.Finalize(None, self.stash_give_back, exitpriority=100)
        plan = fetching.READY_WORKERS.plan(most=max(1, int(Conf.BULK)), wait_s=FALLBACK_POLL_S)
        if plan is None or not plan.count:
            return None
        handed: list[tuple[str, str]] = []
        try:
            stash = self._stash
            # Claim when the stash cannot hand out what the plan asks, when it ran down to
            # half its allowance (a refill carries many tasks in one statement), or when a
            # ready task outranks everything in it (an urgent task is never held back by
            # the stash, however long its tasks turn out to take).
            if (
                len(stash) < plan.count
                or len(stash) * 2 <= plan.allowance
                or self._outranked(stash.top_priority())
            ):
                stash.add(self._claim(max(plan.count, plan.count + plan.allowance - len(stash))))
            if not stash and plan.demand:
                stash.add(self._wait_and_claim(plan.count + plan.allowance))
            handed = stash.take(plan.count)
        except psycopg.OperationalError as exc:
            self._reset(exc)
        finally:
            fetching.READY_WORKERS.handed(plan, len(handed))
        return handed or None

    def stash_give_back(self) -> None:
        """At the exit of a pusher whose cluster stops: the tasks in its stash were
        claimed and their stages started, but no worker will take them. They go back to
        their queue now, their attempts not counted, instead of each waiting out its
        lease and counting a lost attempt (a job without retries left would fail)."""
        tasks = self._stash.take(len(self._stash))
        if not tasks or not _give_back:
            return
        try:
            _give_back[0](tasks)
        except Exception:
            # Those left run again after their lease, as after a crash.
            logger.exception("giving back %d stashed tasks failed", len(tasks))
        finally:
            connection.close()

    def _wait_and_claim(self, limit: int) -> list[ClaimedTask]:
        """Listen, claim once more, wait for an enqueue (or the fallback poll), claim;
        then stop listening and read what else came, so that nothing waits unread on
        this session while the pusher is busy."""
        conn = self._db()
        channel = channel_for(self.queue)
        conn.execute(f'LISTEN "{channel}"')
        try:
            tasks = self._claim(limit)  # enqueued before the LISTEN took effect
            if tasks:
                return tasks
            wait_s = FALLBACK_POLL_S
            due = self._seconds_until_next_due()
            if due is not None:
                wait_s = min(wait_s, due + 0.001)
            for _ in conn.notifies(timeout=wait_s, stop_after=1):
                pass
            return self._claim(limit)
        finally:
            conn.execute(f'UNLISTEN "{channel}"')
            for _ in conn.notifies(timeout=0):  # wake-ups that came meanwhile: read, dropped
                pass

    def acknowledge(self, task_id: str) -> None:
        row_id, deliveries = parse_ack_id(task_id)
        for attempt in range(3):
            try:
                self._db().execute(
                    "DELETE FROM jobs_queuetask WHERE id = %s AND deliveries = %s",
                    [row_id, deliveries],
                )
                return
            except psycopg.OperationalError as exc:
                # Not acknowledged means delivered again after the lease: the stage's own
                # fencing makes that second delivery a no-op, so giving up is safe.
                self._reset(exc)
                if attempt == 2:
                    logger.error("could not acknowledge task %s", task_id)

    def fail(self, task_id: str) -> None:
        self.acknowledge(task_id)

    def delete(self, task_id: str) -> None:
        self.acknowledge(task_id)

    def queue_size(self) -> int:
        return self._count(
            "SELECT count(*) FROM jobs_queuetask "
            "WHERE queue = %s AND visible_at <= statement_timestamp()"
        )

    def lock_size(self) -> int:
        return self._count(
            "SELECT count(*) FROM jobs_queuetask "
            "WHERE queue = %s AND visible_at > statement_timestamp()"
        )

    def _count(self, sql: LiteralString) -> int:
        row = self._db().execute(sql, [self.queue]).fetchone()
        return row[0] if row is not None else 0

    def purge_queue(self) -> int:
        return (
            self._db().execute("DELETE FROM jobs_queuetask WHERE queue = %s", [self.queue]).rowcount
        )

    def delete_queue(self) -> int:
        return self.purge_queue()


def lease_delta() -> timedelta:
    return timedelta(seconds=task_lease_s())
