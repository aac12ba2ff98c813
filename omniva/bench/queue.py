"""The `queue` suite of `manage.py bench`, and the task functions it enqueues.

Every figure comes from real `manage.py qcluster` processes on the same database,
started and stopped by the benchmark, under the same settings for both brokers:

- our broker (jobs.broker.PostgresBroker, what settings name), and
- django-q2's stock ORM broker: the same settings with `broker_class` removed, so that
  django-q2 falls back to its ORM broker on `Q_CLUSTER["orm"]`. Settings have no switch
  for that, so that cluster is started as `python -c BOOTSTRAP`, which changes
  `Q_CLUSTER` in the settings module before running the very same `qcluster` command.
  Everything else comes from the same settings and environment, persistent worker
  connections included: with CONN_MAX_AGE 0 django-q2's ORM broker would reconnect on
  every poll and every acknowledgement (its get_connection calls
  close_old_connections) and drain about a fifth as fast.

What is measured:

1. raw rate: N no-op tasks enqueued in one transaction, then a cluster is started; the
   rate is N over the time from the first finished task seen to the empty queue (the
   parent polls the queue's depth), so the cluster's start-up is not counted;
2. the same for N one-stage `noop` jobs submitted with jobs.services.job_submit (the
   cluster's claim starts each stage, its worker runs it from the grant, and the
   worker's completer writes the completions many per statement), and for N/2
   `fan_out_fan_in` jobs of width 4 (six stages each), with the CPU each role used while
   the one-stage jobs drained;
3. on an idle running cluster, the time from just before an enqueue call to the start
   of the task, which records time.time() in a file;
4. the same for one urgent task (priority 10) enqueued while the cluster works through
   a backlog of low-priority ones (priority 2); the ORM broker has no priorities;
5. the same behind a backlog of low-priority tasks that each take LONG_TASK_S (a stage
   of real work, not a no-op): a broker that fetches ahead of its workers makes the
   urgent task wait for what it fetched; ours fetches by demand, so the urgent task
   starts at the first free worker (less than one LONG_TASK_S).

The rounds of 1 and 2 are interleaved, so that machine noise hits every variant alike.
The benchmark runs in its own database (`omniva_bench`, dropped at the end) when the
database is the embedded one; with DATABASE_URL it uses that database, and a `default`
cluster already running there would take the jobs of figure 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from django.db import connection

from jobs import services
from jobs.broker import channel_for, enqueue_payload
from jobs.models import ACTIVE_STATUSES, Job, JobStatus, QueueTask, StageRun, StageStatus
from omniva.bench.harness import BenchError, percentile, suite_env, table_lines
from omniva.processes import ManagedProcess, qcluster_argv

NOOP = "omniva.bench.queue.bench_noop"
STAMP = "omniva.bench.queue.bench_stamp"
LONG = "omniva.bench.queue.bench_long"
LONG_TASK_S = 1.0

BENCH_QUEUE = "omniva_bench"  # raw tasks go here; jobs of the noop pipeline go to `default`
JOBS_QUEUE = "default"
LOW_PRIORITY = 2
URGENT_PRIORITY = 10
DEPTH_POLL_S = 0.05
STAMP_POLL_S = 0.001
READY_TIMEOUT_S = 120.0

# Targets on the project's 2-core machine (docs/benchmarks.md).
TARGET_JOBS_RATIO = 0.5
TARGET_FAN_OUT_RATIO = 0.1
FAN_OUT_WIDTH = 4
TARGET_IDLE_P50_MS = 10.0
TARGET_URGENT_MS = 50.0
TARGET_URGENT_BEHIND_LONG_MS = LONG_TASK_S * 1000

# Runs `manage.py qcluster` with Q_CLUSTER changed by the JSON object in argv[1] (a key
# set to null is removed). Settings are imported first, seeing the argv of a real
# qcluster: Django's settings object then finds this very module, changed.
BOOTSTRAP = """\
import importlib, json, os, sys
changes = json.loads(sys.argv[1])
sys.argv = ["manage.py", "qcluster"]
s = importlib.import_module(os.environ["DJANGO_SETTINGS_MODULE"])
merged = {**s.Q_CLUSTER, **changes}
s.Q_CLUSTER = {k: v for k, v in merged.items() if v is not None}
from django.core.management import execute_from_command_line
execute_from_command_line(["manage.py", "qcluster"])
"""


# --- the tasks the clusters run ---------------------------------------------------------


def bench_noop() -> None:
    """Nothing: what a no-op task costs is the queue machinery itself."""


def bench_long() -> None:
    """A task of real work: LONG_TASK_S of it."""
    time.sleep(LONG_TASK_S)


def bench_stamp(path: str) -> None:
    """Write when this task started (time.time()) to `path`, atomically."""
    started = time.time()
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        handle.write(repr(started))
    os.replace(partial, path)


# --- the two brokers under test ---------------------------------------------------------


def package(func: str, args: tuple[Any, ...], queue: str) -> str:
    """A signed django-q2 task, the shape jobs.services.task_payload gives a stage."""
    from django.utils import timezone
    from django_q.signing import SignedPackage

    return SignedPackage.dumps(
        {
            "id": uuid.uuid4().hex,
            "name": f"bench:{func.rsplit('.', 1)[-1]}",
            "func": func,
            "args": args,
            "kwargs": {},
            "started": timezone.now(),
            "save": False,
            "cluster": queue,
        }
    )


class QueueUnderTest:
    """What the benchmark needs of a broker: enqueue, bulk-load, depth, purge."""

    key = ""
    label = ""
    has_priority = False
    table = ""
    # Changes to Q_CLUSTER for its clusters (None: run with the settings as they are).
    q_cluster: dict[str, Any] | None = None

    def enqueue(self, queue: str, func: str, args: tuple[Any, ...], *, priority: int) -> None:
        raise NotImplementedError

    def load_backlog(self, queue: str, count: int, *, priority: int) -> None:
        raise NotImplementedError

    def depth(self, queue: str) -> int:
        raise NotImplementedError

    def purge(self, queue: str) -> None:
        raise NotImplementedError


class OmnivaQueue(QueueUnderTest):
    key = "omniva"
    label = "omniva broker"
    has_priority = True
    table = "jobs_queuetask"

    def enqueue(self, queue: str, func: str, args: tuple[Any, ...], *, priority: int) -> None:
        enqueue_payload(queue=queue, payload=package(func, args, queue), priority=priority)

    def load_backlog(self, queue: str, count: int, *, priority: int) -> None:
        # The rows enqueue_payload would write, in bulk (loading is not what is measured).
        from django.db import connection, transaction
        from django.utils import timezone

        now = timezone.now()
        rows = [
            QueueTask(
                queue=queue,
                priority=priority,
                payload=package(NOOP, (), queue),
                visible_at=now,
                deliveries=0,
            )
            for _ in range(count)
        ]
        with transaction.atomic():
            QueueTask.objects.bulk_create(rows, batch_size=2000)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, '')", [channel_for(queue)])

    def depth(self, queue: str) -> int:
        return QueueTask.objects.filter(queue=queue).count()

    def purge(self, queue: str) -> None:
        QueueTask.objects.filter(queue=queue).delete()


class StockOrmQueue(QueueUnderTest):
    key = "orm"
    label = "django-q2 ORM"
    has_priority = False
    table = "django_q_ormq"
    q_cluster = {"broker_class": None, "orm": "default"}

    def enqueue(self, queue: str, func: str, args: tuple[Any, ...], *, priority: int) -> None:
        # What async_task(..., broker=ORM(queue), save=False) does, minus its log line.
        from django_q.brokers.orm import ORM

        ORM(list_key=queue).enqueue(package(func, args, queue))

    def load_backlog(self, queue: str, count: int, *, priority: int) -> None:
        from django.db import transaction
        from django.utils import timezone
        from django_q.models import OrmQ

        now = timezone.now()
        rows = [OrmQ(key=queue, payload=package(NOOP, (), queue), lock=now) for _ in range(count)]
        with transaction.atomic():
            OrmQ.objects.bulk_create(rows, batch_size=2000)

    def depth(self, queue: str) -> int:
        from django_q.models import OrmQ

        return OrmQ.objects.filter(key=queue).count()

    def purge(self, queue: str) -> None:
        from django_q.models import OrmQ

        OrmQ.objects.filter(key=queue).delete()


# --- clusters as child processes --------------------------------------------------------


class Cluster(ManagedProcess):
    """One `qcluster` serving `queue` (with Q_CLUSTER changed by `q_cluster`)."""

    def __init__(
        self,
        *,
        queue: str,
        workers: int,
        database_url: str,
        log_path: Path,
        q_cluster: dict[str, Any] | None = None,
    ) -> None:
        self.queue = queue
        argv = (
            [sys.executable, "-c", BOOTSTRAP, json.dumps(q_cluster)]
            if q_cluster
            else qcluster_argv()
        )
        env = suite_env(database_url, Q_CLUSTER_NAME=queue, OMNIVA_WORKERS=str(workers))
        super().__init__(argv, env=env, log_path=log_path, name=f"qcluster for {queue!r}")


# --- where the CPU goes -----------------------------------------------------------------

CPU_ROLES = ("workers", "cluster", "postgres")


def _cpu_s(process: psutil.Process, *, reaped: bool) -> float:
    times = process.cpu_times()
    own = times.user + times.system
    return own + (times.children_user + times.children_system if reaped else 0.0)


def _role_of(process: psutil.Process) -> str:
    """django-q2 titles its processes when setproctitle is installed (requirements.txt):
    a worker is `qcluster <name> idle` or `… processing <task>`; the rest (the main
    process, the sentinel, the pusher, the monitor) is the cluster's own overhead."""
    title = " ".join(process.cmdline())
    return "workers" if " idle" in title or " processing " in title else "cluster"


def cpu_seconds(cluster_pid: int, postmaster_pid: int) -> dict[str, float]:
    """CPU seconds used so far by each role: the cluster's processes (what a process
    that exited left to its parent, a recycled worker, counts as a worker's) and
    PostgreSQL's (the postmaster and every backend, those that exited included)."""
    used = dict.fromkeys(CPU_ROLES, 0.0)
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(cluster_pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                used[_role_of(process)] += _cpu_s(process, reaped=False)
                times = process.cpu_times()
                used["workers"] += times.children_user + times.children_system
    with contextlib.suppress(psutil.Error):
        postmaster = psutil.Process(postmaster_pid)
        used["postgres"] += _cpu_s(postmaster, reaped=True)
        for process in postmaster.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                used["postgres"] += _cpu_s(process, reaped=True)
    return used


def postmaster_pid() -> int:
    """The pid of the PostgreSQL server the bench runs on (the first line of its
    postmaster.pid); the server must be on this machine."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('data_directory')")
        data_directory = Path(cursor.fetchone()[0])
    return int((data_directory / "postmaster.pid").read_text().split()[0])


# --- the measurements -------------------------------------------------------------------


@dataclass
class Results:
    task_rates: dict[str, list[float]] = field(default_factory=dict)
    enqueue_rates: dict[str, list[float]] = field(default_factory=dict)
    job_rates: list[float] = field(default_factory=list)
    fan_out_rates: list[float] = field(default_factory=list)
    # CPU seconds per 1,000 one-stage jobs, by role (CPU_ROLES), one dict per round.
    job_cpu: list[dict[str, float]] = field(default_factory=list)
    submit_rates: list[float] = field(default_factory=list)
    idle_ms: dict[str, list[float]] = field(default_factory=dict)
    idle_after_commit_ms: dict[str, list[float]] = field(default_factory=dict)
    urgent_ms: dict[str, list[float]] = field(default_factory=dict)
    urgent_after_commit_ms: dict[str, list[float]] = field(default_factory=dict)
    urgent_ahead: dict[str, list[int]] = field(default_factory=dict)
    urgent_behind_long_ms: dict[str, list[float]] = field(default_factory=dict)
    load_before: float = 0.0
    load_after: float = 0.0


@dataclass
class QueueBench:
    database_url: str
    work_dir: Path
    tasks: int = 5000
    jobs: int = 1000
    workers: int = 2
    rounds: int = 2
    samples: int = 50
    backlog: int = 10_000
    urgent_samples: int = 5
    q_cluster: dict[str, Any] = field(default_factory=dict)
    say: Callable[[str], None] = print
    results: Results = field(default_factory=Results)
    clusters: list[Cluster] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queues: list[QueueUnderTest] = [OmnivaQueue(), StockOrmQueue()]

    # --- plumbing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def cluster(self, under_test: QueueUnderTest, queue: str) -> Iterator[Cluster]:
        changes = {**(under_test.q_cluster or {}), **self.q_cluster}
        cluster = Cluster(
            queue=queue,
            workers=self.workers,
            database_url=self.database_url,
            log_path=self.work_dir / f"qcluster-{under_test.key}-{queue}.log",
            q_cluster=changes or None,
        )
        self.clusters.append(cluster)
        cluster.start()
        try:
            yield cluster
        finally:
            cluster.stop()
            self.clusters.remove(cluster)

    def stop_all(self) -> None:
        for cluster in list(self.clusters):
            cluster.stop()
        self.clusters.clear()

    @staticmethod
    def vacuum(*tables: str) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            for table in tables:
                cursor.execute(f"VACUUM ANALYZE {table}")

    def purge_all(self) -> None:
        for under_test in self.queues:
            under_test.purge(BENCH_QUEUE)

    def wait_drained(
        self,
        remaining: Callable[[], int],
        total: int,
        cluster: Cluster,
        timeout_s: float,
        on_first: Callable[[], None] | None = None,
        begun: Callable[[], bool] | None = None,
    ) -> float:
        """Seconds from the first finished task seen (or from when `begun` first says
        so) to none left (polled); `on_first` is called then (the start of the measured
        window)."""
        first_seen = drained_at = 0.0

        def drained() -> bool:
            nonlocal first_seen, drained_at
            left = remaining()
            now = time.perf_counter()
            if not first_seen and (left < total or (begun is not None and begun())):
                first_seen = now
                if on_first is not None:
                    on_first()
            drained_at = now
            return left == 0

        cluster.wait_until(
            drained, what=f"run all {total}", timeout_s=timeout_s, interval_s=DEPTH_POLL_S
        )
        return drained_at - first_seen

    @staticmethod
    def wait_stamp(path: Path, cluster: Cluster, timeout_s: float) -> float:
        def stamped() -> float | None:
            with contextlib.suppress(FileNotFoundError, ValueError):
                return float(path.read_text())
            return None

        return cluster.wait_until(
            stamped, what="start the task", timeout_s=timeout_s, interval_s=STAMP_POLL_S
        )

    def stamp_path(self) -> Path:
        return self.work_dir / f"stamp-{uuid.uuid4().hex}"

    def enqueue_stamp(
        self, under_test: QueueUnderTest, queue: str, priority: int
    ) -> tuple[Path, float, float]:
        """Enqueue a stamp task in its own transaction: (path, before, committed) times."""
        from django.db import transaction

        path = self.stamp_path()
        before = time.time()
        with transaction.atomic():
            under_test.enqueue(queue, STAMP, (str(path),), priority=priority)
        return path, before, time.time()

    def wait_ready(self, under_test: QueueUnderTest, cluster: Cluster) -> None:
        path, _, _ = self.enqueue_stamp(under_test, cluster.queue, 5)
        self.wait_stamp(path, cluster, READY_TIMEOUT_S)
        cluster.wait_until(
            lambda: under_test.depth(cluster.queue) == 0,
            what="empty its queue",
            timeout_s=30,
            interval_s=DEPTH_POLL_S,
        )

    # --- 1. raw task rate ---------------------------------------------------------------

    def task_rate(self, under_test: QueueUnderTest) -> None:
        from django.db import transaction

        under_test.purge(BENCH_QUEUE)
        started = time.perf_counter()
        with transaction.atomic():
            for _ in range(self.tasks):
                under_test.enqueue(BENCH_QUEUE, NOOP, (), priority=5)
        enqueue_s = time.perf_counter() - started
        self.vacuum(under_test.table)
        with self.cluster(under_test, BENCH_QUEUE) as cluster:
            elapsed = self.wait_drained(
                lambda: under_test.depth(BENCH_QUEUE),
                self.tasks,
                cluster,
                timeout_s=max(120.0, self.tasks / 10),
            )
        rate = self.tasks / elapsed
        self.results.task_rates.setdefault(under_test.key, []).append(rate)
        self.results.enqueue_rates.setdefault(under_test.key, []).append(self.tasks / enqueue_s)
        self.say(
            f"  {under_test.label}: {self.tasks} no-op tasks in {elapsed:.2f} s = {rate:.0f}/s"
        )

    # --- 2. jobs end to end -------------------------------------------------------------

    def job_rate(self) -> None:
        rate, cpu = self.jobs_end_to_end("noop", {}, self.jobs)
        self.results.job_rates.append(rate)
        self.results.job_cpu.append({role: 1000 * s / self.jobs for role, s in cpu.items()})
        self.say(
            f"  omniva jobs: {self.jobs} noop jobs = {rate:.0f}/s; CPU s per 1,000: "
            + ", ".join(f"{role} {1000 * s / self.jobs:.2f}" for role, s in cpu.items())
        )
        # Half as many as one-stage jobs: enough stages (six each) for a window of seconds.
        count = max(1, self.jobs // 2)
        rate, _cpu = self.jobs_end_to_end("fan_out_fan_in", {"width": FAN_OUT_WIDTH}, count)
        self.results.fan_out_rates.append(rate)
        self.say(f"  omniva jobs: {count} fan_out_fan_in (width {FAN_OUT_WIDTH}) = {rate:.0f}/s")

    def jobs_end_to_end(
        self, pipeline: str, params: dict[str, Any], count: int
    ) -> tuple[float, dict[str, float]]:
        """`count` jobs of `pipeline` submitted in one transaction, then drained by a
        started cluster: jobs/s from the first finished stage to the last finished job,
        and the CPU seconds each role used meanwhile. (Not from the first finished job:
        the jobs' first stages run before any job of several stages finishes, and a
        window from the first job to the last left most of their work out.)"""
        from django.db import transaction
        from django.test.utils import override_settings
        from django.utils import timezone

        omniva = self.queues[0]
        services.queue_depths_forget()
        submitted_from = timezone.now()
        started = time.perf_counter()
        with (
            override_settings(OMNIVA_QUEUE_LIMIT=count * (FAN_OUT_WIDTH + 2) + 1),
            transaction.atomic(),
        ):
            ids = [
                services.job_submit(pipeline=pipeline, params=params)[0].pk for _ in range(count)
            ]
        submit_s = time.perf_counter() - started
        if pipeline == "noop":
            self.results.submit_rates.append(count / submit_s)
        self.vacuum("jobs_queuetask", "jobs_job", "jobs_stagerun", "jobs_joblog")
        active = Job.objects.filter(
            pipeline=pipeline, created_at__gte=submitted_from, status__in=ACTIVE_STATUSES
        )
        postgres = postmaster_pid()
        with self.cluster(omniva, JOBS_QUEUE) as cluster:
            assert cluster.pid is not None
            pid = cluster.pid
            before: dict[str, float] = {}
            elapsed = self.wait_drained(
                active.count,
                count,
                cluster,
                timeout_s=max(120.0, count / 5),
                # The window starts with the first finished stage, as the rate's does:
                # the cluster's start-up is not counted.
                on_first=lambda: before.update(cpu_seconds(pid, postgres)),
                begun=StageRun.objects.filter(job_id__in=ids, status=StageStatus.COMPLETED).exists,
            )
            after = cpu_seconds(pid, postgres)
        done = Job.objects.filter(pk__in=ids, status=JobStatus.COMPLETED).count()
        if done != count:
            raise BenchError(f"only {done} of {count} {pipeline} jobs completed")
        Job.objects.filter(pk__in=ids).delete()
        return count / elapsed, {role: after[role] - before[role] for role in CPU_ROLES}

    # --- 3 and 4. latency, idle and behind a backlog -------------------------------------

    def latencies(self, under_test: QueueUnderTest) -> None:
        under_test.purge(BENCH_QUEUE)
        with self.cluster(under_test, BENCH_QUEUE) as cluster:
            self.wait_ready(under_test, cluster)
            idle: list[float] = []
            after_commit: list[float] = []
            for _ in range(self.samples):
                # A random pause longer than a poll period: the cluster is idle again,
                # and the enqueue falls at a random point of a polling broker's cycle.
                time.sleep(random.uniform(0.05, 0.25))  # noqa: S311
                path, before, committed = self.enqueue_stamp(under_test, BENCH_QUEUE, 5)
                started = self.wait_stamp(path, cluster, 30)
                idle.append((started - before) * 1000)
                after_commit.append((started - committed) * 1000)
            self.results.idle_ms[under_test.key] = idle
            self.results.idle_after_commit_ms[under_test.key] = after_commit
            self.say(
                f"  {under_test.label}: idle enqueue->start p50 "
                f"{statistics.median(idle):.1f} ms, p95 {percentile(idle, 0.95):.1f} ms"
            )
            self.urgent(under_test, cluster)
            self.urgent_behind_long(under_test, cluster)
        under_test.purge(BENCH_QUEUE)

    def urgent(self, under_test: QueueUnderTest, cluster: Cluster) -> None:
        under_test.load_backlog(BENCH_QUEUE, self.backlog, priority=LOW_PRIORITY)
        cluster.wait_until(
            lambda: under_test.depth(BENCH_QUEUE) < self.backlog,
            what="start on the backlog",
            timeout_s=60,
            interval_s=DEPTH_POLL_S,
        )
        samples = self.urgent_samples if under_test.has_priority else 1
        latencies: list[float] = []
        after_commit: list[float] = []
        ahead: list[int] = []
        for _ in range(samples):
            time.sleep(0.2)  # the cluster is busy with the backlog
            left = under_test.depth(BENCH_QUEUE)
            if left < self.backlog // 4:
                break
            path, before, committed = self.enqueue_stamp(under_test, BENCH_QUEUE, URGENT_PRIORITY)
            started = self.wait_stamp(path, cluster, max(300.0, self.backlog / 10))
            latencies.append((started - before) * 1000)
            after_commit.append((started - committed) * 1000)
            ahead.append(left)
        if not latencies:
            raise BenchError("the backlog drained before an urgent task could be sent")
        self.results.urgent_ms[under_test.key] = latencies
        self.results.urgent_after_commit_ms[under_test.key] = after_commit
        self.results.urgent_ahead[under_test.key] = ahead
        self.say(
            f"  {under_test.label}: urgent start behind ~{ahead[0]} low-priority tasks: "
            + ", ".join(f"{ms:.0f}" for ms in latencies)
            + " ms"
        )
        under_test.purge(BENCH_QUEUE)

    def urgent_behind_long(self, under_test: QueueUnderTest, cluster: Cluster) -> None:
        """Figure 5: an urgent task behind low-priority tasks of LONG_TASK_S each."""
        from django.db import transaction

        backlog = self.workers * 12
        with transaction.atomic():
            for _ in range(backlog):
                under_test.enqueue(BENCH_QUEUE, LONG, (), priority=LOW_PRIORITY)
        cluster.wait_until(
            lambda: under_test.depth(BENCH_QUEUE) < backlog,
            what="start on the backlog",
            timeout_s=60,
            interval_s=DEPTH_POLL_S,
        )
        samples = self.urgent_samples if under_test.has_priority else 1
        latencies: list[float] = []
        for _ in range(samples):
            # A random point of the running tasks' second.
            time.sleep(random.uniform(0.1, LONG_TASK_S))  # noqa: S311
            if under_test.depth(BENCH_QUEUE) < backlog // 3:
                break
            path, before, _ = self.enqueue_stamp(under_test, BENCH_QUEUE, URGENT_PRIORITY)
            started = self.wait_stamp(path, cluster, backlog * LONG_TASK_S + 60)
            latencies.append((started - before) * 1000)
        if not latencies:
            raise BenchError("the long backlog drained before an urgent task could be sent")
        self.results.urgent_behind_long_ms[under_test.key] = latencies
        self.say(
            f"  {under_test.label}: urgent start behind {backlog} tasks of {LONG_TASK_S:.0f} s: "
            + ", ".join(f"{ms:.0f}" for ms in latencies)
            + " ms"
        )
        under_test.purge(BENCH_QUEUE)

    # --- the whole suite ----------------------------------------------------------------

    def run(self) -> Results:
        self.results.load_before = os.getloadavg()[0]
        try:
            self.purge_all()
            for round_number in range(1, self.rounds + 1):
                self.say(f"round {round_number}/{self.rounds}")
                for under_test in self.queues:
                    self.task_rate(under_test)
                self.job_rate()
            self.say("latency")
            for under_test in self.queues:
                self.latencies(under_test)
        finally:
            self.stop_all()
            self.purge_all()
        self.results.load_after = os.getloadavg()[0]
        return self.results

    # --- the table ----------------------------------------------------------------------

    def report(self) -> list[str]:
        r = self.results
        ours, orm = (q.key for q in self.queues)
        med = statistics.median
        our_rate, orm_rate = med(r.task_rates[ours]), med(r.task_rates[orm])
        our_rounds = r.task_rates[ours]
        job_rate = med(r.job_rates)
        fan_out_rate = med(r.fan_out_rates)
        cpu = {role: med(round_cpu[role] for round_cpu in r.job_cpu) for role in CPU_ROLES}
        idle_ours, idle_orm = r.idle_ms[ours], r.idle_ms[orm]
        urgent_ours, urgent_orm = r.urgent_ms[ours], r.urgent_ms[orm]
        long_ours, long_orm = r.urgent_behind_long_ms[ours], r.urgent_behind_long_ms[orm]

        def met(ok: bool) -> str:
            return "yes" if ok else "NO"

        rows = [
            (
                "no-op tasks/s",
                f"{our_rate:.0f}",
                f"{orm_rate:.0f}",
                ">= ORM",
                met(our_rate >= orm_rate),
            ),
            (
                "1-stage noop jobs/s",
                f"{job_rate:.0f} ({job_rate / our_rate:.0%})",
                "",
                f">= {TARGET_JOBS_RATIO:.0%} of tasks/s",
                met(job_rate >= TARGET_JOBS_RATIO * our_rate),
            ),
            (
                f"fan_out_fan_in (width {FAN_OUT_WIDTH}) jobs/s",
                f"{fan_out_rate:.0f} ({fan_out_rate / our_rate:.0%})",
                "",
                f">= {TARGET_FAN_OUT_RATIO:.0%} of tasks/s",
                met(fan_out_rate >= TARGET_FAN_OUT_RATIO * our_rate),
            ),
            (
                "idle enqueue->start p50 ms",
                f"{med(idle_ours):.1f}",
                f"{med(idle_orm):.1f}",
                f"< {TARGET_IDLE_P50_MS:.0f}",
                met(med(idle_ours) < TARGET_IDLE_P50_MS),
            ),
            (
                "idle enqueue->start p95 ms",
                f"{percentile(idle_ours, 0.95):.1f}",
                f"{percentile(idle_orm, 0.95):.1f}",
                "",
                "",
            ),
            (
                f"urgent behind {self.backlog} ms",
                f"{med(urgent_ours):.1f} (max {max(urgent_ours):.0f})",
                f"{med(urgent_orm):.0f} (FIFO)",
                f"< {TARGET_URGENT_MS:.0f}",
                met(med(urgent_ours) < TARGET_URGENT_MS),
            ),
            (
                f"urgent behind {LONG_TASK_S:.0f} s tasks ms",
                f"{med(long_ours):.0f} (max {max(long_ours):.0f})",
                f"{med(long_orm):.0f} (FIFO)",
                f"< {TARGET_URGENT_BEHIND_LONG_MS:.0f}",
                met(med(long_ours) < TARGET_URGENT_BEHIND_LONG_MS),
            ),
        ]
        header = ("figure", "omniva broker", "django-q2 ORM", "target", "met")

        changes = f"; Q_CLUSTER changes {self.q_cluster}" if self.q_cluster else ""
        rounds = "; ".join(
            f"{q.label} " + ", ".join(f"{v:.0f}" for v in r.task_rates[q.key]) for q in self.queues
        )
        enqueue = "; ".join(
            f"{q.label} {med(r.enqueue_rates[q.key]):.0f} tasks/s" for q in self.queues
        )
        after_commit = "; ".join(
            f"{q.label} idle {med(r.idle_after_commit_ms[q.key]):.1f} ms, "
            f"urgent {med(r.urgent_after_commit_ms[q.key]):.1f} ms"
            for q in self.queues
        )
        urgent = "; ".join(
            f"{q.label} "
            + ", ".join(
                f"{ms:.0f} ({left})"
                for ms, left in zip(r.urgent_ms[q.key], r.urgent_ahead[q.key], strict=True)
            )
            for q in self.queues
        )
        return [
            "",
            f"bench queue, {time.strftime('%Y-%m-%d %H:%M')}: {self.workers} workers, "
            f"{self.tasks} tasks and {self.jobs} jobs x {self.rounds} rounds (medians), "
            f"{self.samples} idle samples, backlog {self.backlog}{changes}",
            f"{os.cpu_count()} cores, load average {r.load_before:.2f} before, "
            f"{r.load_after:.2f} after",
            *table_lines(header, rows),
            f"rounds, tasks/s: {rounds}; jobs/s " + ", ".join(f"{v:.0f}" for v in r.job_rates),
            # The same ratios round by round: each round's jobs beside its own raw rate,
            # minutes apart, where the medians above may come from different rounds.
            "each round's jobs/s over its own no-op tasks/s: 1-stage "
            + ", ".join(f"{j / t:.0%}" for j, t in zip(r.job_rates, our_rounds, strict=True))
            + "; fan-out "
            + ", ".join(f"{f / t:.0%}" for f, t in zip(r.fan_out_rates, our_rounds, strict=True)),
            "CPU seconds per 1,000 one-stage jobs (all cores): "
            + ", ".join(f"{role} {cpu[role]:.2f}" for role in CPU_ROLES)
            + f" = {sum(cpu.values()):.2f}",
            f"enqueue in one transaction: {enqueue}; job_submit {med(r.submit_rates):.0f} jobs/s",
            f"p50 from the enqueue's commit (not the call) to the start: {after_commit}",
            f"urgent samples, ms (low-priority tasks left): {urgent}",
        ]
