"""`manage.py bench [api|queue|events|live|gpu|web|soak]`: benchmarks printing side-by-side ratios.

With no suite named, every suite runs (`make bench`).

The suites live in omniva/bench/, one module each; this command parses the options,
checks them, starts the embedded database unless DATABASE_URL is set, and runs them.

`api` measures what the /v1 conventions cost a request: the same authenticated GET
served by the full middleware stack, without the audit middleware, and without the
rate limiter, in interleaved rounds so that machine noise hits every variant alike.
It runs in-process (Django's test client), so the audit row is written before the
call returns; in a web process it joins a batch, so these figures are the upper bound
of what a client can see. It also times each convention as a web process pays it: the
rate limit charged in chunks, the API key looked up and cached, the audit row alone and
in a batch of 100 (see omniva/bench/api.py).

`queue` measures the job engine against real `qcluster` processes: our PostgreSQL
broker beside django-q2's stock ORM broker (see omniva/bench/queue.py).

`events` measures the leased event queue through the HTTP API of a real daphne
server: events claimed and completed per second by concurrent engine clients, beside
the GET /v1/health requests per second of the same server (see omniva/bench/events.py).

`gpu` measures the gpu queue's stages in this process: embed_texts jobs run per item
and batched across jobs at batch 1, 8, 32, 128 beside the raw forward pass, and the
upscale's megapixels per second (see omniva/bench/gpu.py). Stop gpu workers on the
same database first, or they take some of its jobs.

`live` measures the live stream: websocket clients of one daphne on /ws/events, and
the time from a state change committed by a `qcluster` worker to its arrival at every
client, p50 and p99 (see omniva/bench/live.py).

`web` measures Omniva's web tier against the setup a Django user would pick, in one
run and under one load generator (wrk, 2 threads, 32 connections, `--duration` seconds
per path): a bare DRF view running one query under gunicorn (2 x cores sync workers,
persistent connections, the suite's database), then Omniva as `manage.py serve` runs
it: `GET /v1/jobs/{id}`, `GET /v1/health`, `POST /v1/jobs` (noop); engine events
claimed and completed per second by `--clients` engine threads with per-event and
with batched reports (`--events` queued); and `--waiters` concurrent sync submissions
of `engine_echo` jobs, parked because no `echo` engine runs until the suite starts
one: their answers by status code, the database's connections while they wait, and
a probe's p50/p99. It prints req/s with the ratio to the reference and issue 18's
targets as met / not met (see omniva/bench/web.py). It needs `wrk` on the PATH.

`soak` runs the whole platform as `make run` does (daphne, grpcserver, a `qcluster` per
queue, and an `echo` engine) under a steady load for 10 minutes (`--soak-s`): jobs of
mixed pipelines over HTTP at a fixed rate, websocket clients, API reads. It samples the
RSS of every process (a cluster's forked processes too) and fails when one grew over
its bound from the end of the warm-up, exited, or when a job was lost (see
omniva/bench/soak.py). It runs last.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from omniva.bench.harness import SuiteFailed, bench_database, work_folder
from omniva.embedded_db import EmbeddedServer

SUITES = ["api", "queue", "events", "live", "gpu", "web", "soak"]
DEFAULT_ROUNDS = {"api": 5, "queue": 2, "events": 3, "live": 1, "gpu": 1, "web": 1, "soak": 1}


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


class Command(BaseCommand):
    help = "Run benchmarks and print their tables (see docs/benchmarks.md)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "suite", nargs="?", choices=SUITES, help="The suite to run (default: every suite)."
        )
        parser.add_argument(
            "--rounds",
            type=int,
            help="Interleaved rounds per variant (api: 5, queue: 2, events: 3, live: 1; gpu, "
            "web and soak run once).",
        )
        parser.add_argument(
            "--requests", type=int, default=400, help="api: requests per variant per round."
        )
        parser.add_argument(
            "--tasks", type=int, default=5000, help="queue: no-op tasks per throughput round."
        )
        parser.add_argument(
            "--jobs",
            type=int,
            default=1000,
            help="queue: 1-stage noop jobs per round (a job costs ~10 tasks).",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=settings.OMNIVA_WORKERS,
            help="queue, live, soak: workers of every cluster (OMNIVA_WORKERS; bulk and "
            "queue_limit follow).",
        )
        parser.add_argument(
            "--samples", type=int, default=50, help="queue: idle latency samples per broker."
        )
        parser.add_argument(
            "--backlog",
            type=int,
            default=10_000,
            help="queue: low-priority tasks ahead of the urgent one.",
        )
        parser.add_argument(
            "--q-set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="queue: change Q_CLUSTER for every cluster (JSON value), e.g. bulk=8.",
        )
        parser.add_argument(
            "--events",
            type=int,
            default=2000,
            help="events: events queued, then claimed and completed, per round; web: events "
            "queued per report mode (claimed and completed for at most --duration).",
        )
        parser.add_argument(
            "--clients",
            type=int,
            default=4,
            help="events, web: concurrent engine clients (threads, one connection each).",
        )
        parser.add_argument(
            "--ws-clients",
            type=int,
            default=100,
            help="live: websocket clients on /ws/events (one asyncio loop).",
        )
        parser.add_argument(
            "--live-jobs",
            type=int,
            default=200,
            help="live: noop jobs per round.",
        )
        parser.add_argument(
            "--live-interval-s",
            type=float,
            default=0.2,
            help="live: seconds between two submissions.",
        )
        parser.add_argument(
            "--gpu-jobs",
            type=int,
            default=128,
            help="gpu: embed_texts jobs per batch size (at least twice the batch).",
        )
        parser.add_argument(
            "--duration",
            type=float,
            default=8.0,
            help="web: seconds of wrk load per path, and at most per engine-events mode.",
        )
        parser.add_argument(
            "--waiters",
            type=int,
            default=1000,
            help="web: concurrent sync submissions (asyncio clients, one connection each).",
        )
        parser.add_argument(
            "--sync-timeout-s",
            type=float,
            default=20.0,
            help="web: the waiters' sync_timeout_s (at most 300).",
        )
        parser.add_argument(
            "--soak-s",
            type=float,
            default=600.0,
            help="soak: seconds of load measured, after the warm-up.",
        )
        parser.add_argument(
            "--soak-warmup-s",
            type=float,
            default=60.0,
            help="soak: seconds of load before the memory it is measured from.",
        )
        parser.add_argument(
            "--soak-sample-s", type=float, default=5.0, help="soak: seconds between samples."
        )
        parser.add_argument(
            "--soak-rate", type=float, default=4.0, help="soak: jobs submitted per second."
        )
        parser.add_argument(
            "--soak-ws-clients",
            type=int,
            default=10,
            help="soak: websocket clients on /ws/events.",
        )
        parser.add_argument(
            "--soak-reads", type=float, default=2.0, help="soak: API reads per second."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        suites = [options["suite"]] if options["suite"] else SUITES
        if "queue" in suites:
            options["q_cluster"] = self._queue_options(options)
        if "events" in suites and (options["events"] < 100 or options["clients"] < 1):
            raise CommandError("--events must be at least 100, --clients at least 1")
        if "live" in suites and (
            options["ws_clients"] < 1 or options["live_jobs"] < 10 or options["live_interval_s"] < 0
        ):
            raise CommandError(
                "--ws-clients must be at least 1, --live-jobs at least 10, "
                "--live-interval-s not negative"
            )
        if "web" in suites and (
            options["duration"] < 1
            or options["waiters"] < 1
            or options["events"] < 1
            or options["clients"] < 1
            or not 1 <= options["sync_timeout_s"] <= 300
        ):
            raise CommandError(
                "--duration must be at least 1, --waiters, --events and --clients at least 1, "
                "--sync-timeout-s between 1 and 300"
            )
        if "soak" in suites:
            self._check_soak_options(options)
        # SIGTERM (a timeout, CI) unwinds like Ctrl-C: clusters and the database stop.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        database = None
        if not settings.DATABASE_URL:
            database = EmbeddedServer(
                settings.VAR_DIR / "pg", database=settings.DATABASES["default"]["NAME"]
            )
            database.start(owner_pid=os.getpid())
        try:
            call_command("migrate", interactive=False, verbosity=0)
            for suite in suites:
                rounds = options["rounds"] or DEFAULT_ROUNDS[suite]
                if suite == "api":
                    self.bench_api(options["requests"], rounds)
                elif suite == "queue":
                    self.bench_queue(database, rounds, options)
                elif suite == "events":
                    self.bench_events(database, rounds, options)
                elif suite == "live":
                    self.bench_live(database, rounds, options)
                elif suite == "gpu":
                    self.bench_gpu(options)
                elif suite == "web":
                    self.bench_web(database, options)
                else:
                    self.bench_soak(database, options)
        finally:
            connections.close_all()
            if database is not None and database.owned_by(os.getpid()):
                database.stop()

    def bench_api(self, requests: int, rounds: int) -> None:
        from omniva.bench.api import ApiBench

        bench = ApiBench(requests=requests, rounds=rounds)
        bench.run()
        for line in bench.report():
            self.stdout.write(line)

    @staticmethod
    def _queue_options(options: dict[str, Any]) -> dict[str, Any]:
        """Check the queue suite's options; return the Q_CLUSTER changes of --q-set."""
        if min(options["tasks"], options["jobs"]) < 200:
            raise CommandError("--tasks and --jobs must be at least 200")
        if options["workers"] < 1 or options["samples"] < 1 or options["backlog"] < 1000:
            raise CommandError("--workers and --samples must be at least 1, --backlog 1000")
        q_cluster: dict[str, Any] = {}
        for item in options["q_set"]:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise CommandError(f"--q-set takes KEY=VALUE, not {item!r}")
            try:
                q_cluster[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                q_cluster[key.strip()] = raw
        return q_cluster

    def _say(self, message: str) -> None:
        self.stdout.write(message)
        self.stdout.flush()

    def _run_suite(
        self,
        suite: str,
        database: EmbeddedServer | None,
        shared_database_warning: str,
        build: Callable[[str, Any], Any],
    ) -> None:
        """Run a suite that starts processes of its own, in a database of its own."""
        if database is None:
            self._say(
                f"bench {suite} runs in the database of DATABASE_URL: {shared_database_warning}"
            )
        with bench_database(database) as url, work_folder(suite) as folder:
            bench = build(url, folder)
            try:
                bench.run()
            except SuiteFailed as exc:
                raise CommandError(f"bench {suite} failed: {exc}") from None
            for line in bench.report():
                self.stdout.write(line)
            # A suite that judges what it measured (the soak's bounds) fails after its
            # table, inside the work folder, so that the process logs are kept.
            failures = bench.failures() if hasattr(bench, "failures") else []
            if failures:
                raise CommandError(f"bench {suite} failed: " + "; ".join(failures))

    def bench_queue(
        self, database: EmbeddedServer | None, rounds: int, options: dict[str, Any]
    ) -> None:
        from omniva.bench.queue import QueueBench

        self._run_suite(
            "queue",
            database,
            "a `default` qcluster already serving it would take the benchmark's jobs.",
            lambda url, folder: QueueBench(
                database_url=url,
                work_dir=folder,
                tasks=options["tasks"],
                jobs=options["jobs"],
                workers=options["workers"],
                rounds=rounds,
                samples=options["samples"],
                backlog=options["backlog"],
                q_cluster=options["q_cluster"],
                say=self._say,
            ),
        )

    def bench_events(
        self, database: EmbeddedServer | None, rounds: int, options: dict[str, Any]
    ) -> None:
        from omniva.bench.events import EventsBench

        self._run_suite(
            "events",
            database,
            "an engine of type `bench` already serving it would take the benchmark's events.",
            lambda url, folder: EventsBench(
                database_url=url,
                work_dir=folder,
                events=options["events"],
                clients=options["clients"],
                rounds=rounds,
                say=self._say,
            ),
        )

    def bench_live(
        self, database: EmbeddedServer | None, rounds: int, options: dict[str, Any]
    ) -> None:
        from omniva.bench.live import LiveBench

        self._run_suite(
            "live",
            database,
            "a `default` qcluster already serving it takes some of the benchmark's jobs "
            "(their latency counts all the same).",
            lambda url, folder: LiveBench(
                database_url=url,
                work_dir=folder,
                clients=options["ws_clients"],
                jobs=options["live_jobs"],
                interval_s=options["live_interval_s"],
                rounds=rounds,
                workers=options["workers"],
                say=self._say,
            ),
        )

    def bench_web(self, database: EmbeddedServer | None, options: dict[str, Any]) -> None:
        from omniva.bench.web import WebBench

        self._run_suite(
            "web",
            database,
            "its figures share the machine and the database with whatever else runs there, "
            "and an `echo` engine already serving it releases the waiters early.",
            lambda url, folder: WebBench(
                database_url=url,
                work_dir=folder,
                duration_s=options["duration"],
                clients=options["clients"],
                events=options["events"],
                waiters=options["waiters"],
                sync_timeout_s=options["sync_timeout_s"],
                say=self._say,
            ),
        )

    @staticmethod
    def _check_soak_options(options: dict[str, Any]) -> None:
        if options["soak_s"] <= 0 or options["soak_warmup_s"] < 0:
            raise CommandError("--soak-s must be positive, --soak-warmup-s not negative")
        if not 0 < options["soak_sample_s"] <= options["soak_s"]:
            raise CommandError("--soak-sample-s must be positive and at most --soak-s")
        if options["soak_rate"] <= 0 or options["soak_reads"] <= 0:
            raise CommandError("--soak-rate and --soak-reads must be positive")
        if options["soak_ws_clients"] < 1:
            raise CommandError("--soak-ws-clients must be at least 1")

    def bench_soak(self, database: EmbeddedServer | None, options: dict[str, Any]) -> None:
        from omniva.bench.soak import SoakBench

        self._run_suite(
            "soak",
            database,
            "a `qcluster` or engine already serving it takes some of the soak's work, and "
            "their memory is not measured.",
            lambda url, folder: SoakBench(
                database_url=url,
                work_dir=folder,
                soak_s=options["soak_s"],
                warmup_s=options["soak_warmup_s"],
                sample_s=options["soak_sample_s"],
                rate_per_s=options["soak_rate"],
                ws_clients=options["soak_ws_clients"],
                reads_per_s=options["soak_reads"],
                workers=options["workers"],
                say=self._say,
            ),
        )

    def bench_gpu(self, options: dict[str, Any]) -> None:
        from omniva.bench.gpu import GpuBench

        bench = GpuBench(jobs_per_size=options["gpu_jobs"], say=self._say)
        try:
            bench.run()
        except SuiteFailed as exc:
            raise CommandError(f"bench gpu failed: {exc}") from None
        for line in bench.report():
            self.stdout.write(line)
