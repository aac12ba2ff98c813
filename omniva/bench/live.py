"""The `live` suite of `manage.py bench`: how long a worker's transition takes to reach
the websocket clients of the live stream (docs/live.md).

A real server (daphne serving `omniva.asgi:application`, as `manage.py serve` starts
it) and a real `qcluster` for the `default` queue run against the suite's database.
This process holds C websocket clients (`websockets`, all on one asyncio event loop) on
`/ws/events` with an API key of scope `jobs:read`, and submits N `noop` jobs with
`POST /v1/jobs` on one keep-alive connection (from a thread, so that the loop only
reads), one every `interval_s` (0.2 s): few enough that the worker has no queue, so
the figures are the latency of each transition, not the time a backlog takes to drain.

For each client and each job, the arrival time is taken when its `job:update` with
status `completed` comes off the socket (time.time(), before the JSON is parsed), and
the latency is arrival - `data.updated_at`, the time the worker's completing statement
stamped on the job (same machine clock). That stamp is taken just before the statement
runs, so the figure includes the statement and its commit, then the server's read
(woken by NOTIFY), the fan-out to every consumer, and the client's loop (its lag, the
overshoot of a 10 ms sleep, is reported beside, to tell it apart). Targets are on
p50 and p99 over every (client, job) pair. Before the first round a few jobs warm up the
worker, the feed and every consumer; a client closed before the end fails the suite.
The server runs with a rate limit high enough never to refuse the submissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from jobs.models import Job
from omniva import services
from omniva.bench.events import Server
from omniva.bench.harness import HOST, BenchError, percentile, table_lines
from omniva.bench.queue import Cluster
from omniva.models import Activity, ApiKey, AuditRecord, Scope

PIPELINE = "noop"
SUBMIT_INTERVAL_S = 0.2
LAG_TICK_S = 0.01
WARMUP_JOBS = 3
# The first warm-up job also waits for the worker to start.
WARMUP_TIMEOUT_S = 120.0
# After the last submission, for the last arrivals.
DRAIN_TIMEOUT_S = 60.0
OPEN_TIMEOUT_S = 30.0
# Handshakes at once: each costs the server a key lookup and a snapshot query.
CONNECTING_AT_ONCE = 10
POLL_S = 0.05
PROGRESS_EVERY_S = 10.0
HTTP_TIMEOUT_S = 30.0

TARGET_P50_MS = 50.0
TARGET_P99_MS = 200.0


def _timestamp(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


class Submitter:
    """POST /v1/jobs on one keep-alive connection (blocking: run it in a thread)."""

    def __init__(self, port: int, secret: str) -> None:
        self.connection = http.client.HTTPConnection(HOST, port, timeout=HTTP_TIMEOUT_S)
        self.headers = {
            "Authorization": f"Bearer {secret}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self.body = json.dumps({"pipeline": PIPELINE, "params": {}}).encode()

    def submit(self) -> str:
        try:
            self.connection.request("POST", "/v1/jobs", body=self.body, headers=self.headers)
            response = self.connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()
            raise BenchError(f"POST /v1/jobs: {exc.__class__.__name__}: {exc}") from exc
        if response.status != 202:
            raise BenchError(f"POST /v1/jobs answered {response.status}: {raw[:300]!r}")
        return json.loads(raw)["data"]["id"]

    def close(self) -> None:
        self.connection.close()


@dataclass
class Results:
    latencies_ms: list[float] = field(default_factory=list)  # every (client, job)
    first_ms: list[float] = field(default_factory=list)  # per job, its first client
    spread_ms: list[float] = field(default_factory=list)  # per job, last - first client
    round_p50_ms: list[float] = field(default_factory=list)
    round_p99_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    loop_lag_ms: list[float] = field(default_factory=list)  # this process's, in the rounds
    messages: int = 0  # received by every client during the rounds
    measured_s: float = 0.0
    audit_rows: int = 0
    load_before: float = 0.0
    load_after: float = 0.0


@dataclass
class LiveBench:
    database_url: str
    work_dir: Path
    clients: int = 100
    jobs: int = 200
    rounds: int = 1
    workers: int = 2
    interval_s: float = SUBMIT_INTERVAL_S
    say: Callable[[str], None] = print
    results: Results = field(default_factory=Results)

    def __post_init__(self) -> None:
        self.server: Server | None = None
        self.cluster: Cluster | None = None
        self.key: Any = None
        self.secret = ""
        self.job_ids: list[str] = []
        self.sockets: list[ClientConnection] = []
        # Per client: job id -> (arrival, updated_at) of its first `completed` update.
        self.arrivals: list[dict[str, tuple[float, str]]] = []
        # Per job: how many clients have its `completed` update.
        self.counts: Counter[str] = Counter()
        self.closed: dict[int, str] = {}
        self.closing = False
        self.messages = 0
        self.measuring = False

    # --- setup and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        self.key, self.secret = services.api_key_create(
            name=f"bench-live-{time.time_ns()}", scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE]
        )
        self.server = Server(self.database_url, self.work_dir / "daphne.log")
        self.server.start()
        self.cluster = Cluster(
            queue="default",
            workers=self.workers,
            database_url=self.database_url,
            log_path=self.work_dir / "qcluster-default.log",
        )
        self.cluster.start()
        self.server.wait_ready()

    def teardown(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        # With DATABASE_URL the suite runs in a database that is kept.
        Job.objects.filter(pk__in=self.job_ids).delete()
        Activity.objects.filter(job_id__in=self.job_ids).delete()
        if self.key is not None:
            audit = AuditRecord.objects.filter(api_key=self.key)
            self.results.audit_rows = audit.count()
            audit.delete()
            ApiKey.objects.filter(pk=self.key.pk).delete()
            self.key = None

    def check_alive(self) -> None:
        assert self.server is not None
        assert self.cluster is not None
        self.server.check_alive()
        self.cluster.check_alive()
        if self.closed:
            index, why = next(iter(self.closed.items()))
            raise BenchError(
                f"{len(self.closed)} clients were closed by the server; client {index}: {why}\n"
                + self.server.log_tail()
            )

    # --- the clients ------------------------------------------------------------------------

    async def open_all(self) -> list[asyncio.Task[None]]:
        assert self.server is not None
        uri = f"ws://{HOST}:{self.server.port}/ws/events?token={self.secret}"
        gate = asyncio.Semaphore(CONNECTING_AT_ONCE)

        async def open_one() -> ClientConnection:
            async with gate:
                ws = await connect(uri, open_timeout=OPEN_TIMEOUT_S, max_queue=None)
                first = json.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_S))
                if first.get("type") != "snapshot":
                    raise BenchError(f"the first message is no snapshot: {first}")
                return ws

        try:
            opened = await asyncio.gather(*(open_one() for _ in range(self.clients)))
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise BenchError(
                f"a websocket client could not connect: {exc!r}\n"
                + (self.server.log_tail() if self.server else "")
            ) from exc
        self.sockets = list(opened)
        self.arrivals = [{} for _ in self.sockets]
        return [
            asyncio.create_task(self.listen(index, ws)) for index, ws in enumerate(self.sockets)
        ]

    async def listen(self, index: int, ws: ClientConnection) -> None:
        seen = self.arrivals[index]
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                now = time.time()
                self.messages += 1
                message = json.loads(raw)
                if message.get("type") != "job:update":
                    continue
                data = message.get("data") or {}
                job_id = message.get("job_id")
                if data.get("status") == "completed" and job_id not in seen:
                    seen[job_id] = (now, data["updated_at"])
                    self.counts[job_id] += 1
        if not self.closing:
            self.closed[index] = f"close code {ws.close_code} {ws.close_reason!r}"

    async def close_all(self, listeners: list[asyncio.Task[None]]) -> None:
        self.closing = True
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)

    def missing(self, job_ids: list[str]) -> int:
        return sum(self.clients - self.counts[job_id] for job_id in job_ids)

    async def wait_arrivals(self, job_ids: list[str], timeout_s: float, during: str) -> None:
        deadline = time.monotonic() + timeout_s
        while missing := self.missing(job_ids):
            self.check_alive()
            if time.monotonic() > deadline:
                assert self.cluster is not None
                raise BenchError(
                    f"{missing} of {len(job_ids) * self.clients} arrivals still missing "
                    f"{timeout_s:.0f} s into {during}:\n{self.cluster.log_tail()}"
                )
            await asyncio.sleep(POLL_S)

    # --- the measurements -------------------------------------------------------------------

    async def submit(self, submitter: Submitter) -> str:
        started = time.perf_counter()
        job_id = await asyncio.to_thread(submitter.submit)
        self.results.submit_ms.append((time.perf_counter() - started) * 1000)
        self.job_ids.append(job_id)
        return job_id

    async def warm_up(self, submitter: Submitter) -> None:
        for _ in range(WARMUP_JOBS):
            job_id = await self.submit(submitter)
            await self.wait_arrivals([job_id], WARMUP_TIMEOUT_S, "warming up")
        self.results.submit_ms.clear()

    async def one_round(self, submitter: Submitter) -> None:
        loop = asyncio.get_running_loop()
        job_ids: list[str] = []
        messages_before = self.messages
        self.measuring = True
        started = loop.time()
        reported = started
        for number in range(self.jobs):
            await asyncio.sleep(max(0.0, started + number * self.interval_s - loop.time()))
            job_ids.append(await self.submit(submitter))
            self.check_alive()
            if loop.time() - reported >= PROGRESS_EVERY_S:
                reported = loop.time()
                arrived = sum(self.counts[job_id] for job_id in job_ids)
                self.say(
                    f"  {number + 1}/{self.jobs} jobs submitted, "
                    f"{arrived}/{len(job_ids) * self.clients} arrivals"
                )
        await self.wait_arrivals(job_ids, DRAIN_TIMEOUT_S, "the round")
        self.measuring = False
        self.results.measured_s += loop.time() - started
        self.results.messages += self.messages - messages_before
        self.record(job_ids)

    def record(self, job_ids: list[str]) -> None:
        r = self.results
        latencies: list[float] = []
        for job_id in job_ids:
            arrivals = [client[job_id][0] for client in self.arrivals]
            updated = _timestamp(self.arrivals[0][job_id][1])
            latencies.extend((arrival - updated) * 1000 for arrival in arrivals)
            r.first_ms.append((min(arrivals) - updated) * 1000)
            r.spread_ms.append((max(arrivals) - min(arrivals)) * 1000)
        r.latencies_ms.extend(latencies)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        r.round_p50_ms.append(p50)
        r.round_p99_ms.append(p99)
        self.say(
            f"  {len(latencies)} arrivals: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"max {max(latencies):.1f} ms"
        )

    async def watch_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            if self.measuring:
                self.results.loop_lag_ms.append((loop.time() - before - LAG_TICK_S) * 1000)

    async def measure(self) -> None:
        assert self.server is not None
        submitter = Submitter(self.server.port, self.secret)
        listeners: list[asyncio.Task[None]] = []
        lag = asyncio.create_task(self.watch_lag())
        try:
            self.say(f"connecting {self.clients} websocket clients")
            listeners = await self.open_all()
            self.say(f"warming up: {WARMUP_JOBS} jobs, each to every client")
            await self.warm_up(submitter)
            for round_number in range(1, self.rounds + 1):
                self.say(
                    f"round {round_number}/{self.rounds}: {self.jobs} {PIPELINE} jobs, "
                    f"one every {self.interval_s:.2f} s"
                )
                await self.one_round(submitter)
        finally:
            lag.cancel()
            await self.close_all(listeners)
            submitter.close()

    # --- the whole suite ----------------------------------------------------------------------

    def run(self) -> Results:
        self.results.load_before = os.getloadavg()[0]
        try:
            self.setup()
            asyncio.run(self.measure())
        finally:
            self.teardown()
        self.results.load_after = os.getloadavg()[0]
        return self.results

    # --- the table ----------------------------------------------------------------------------

    def report(self) -> list[str]:
        r = self.results
        p50 = percentile(r.latencies_ms, 0.5)
        p99 = percentile(r.latencies_ms, 0.99)

        def met(ok: bool) -> str:
            return "yes" if ok else "NO"

        rows = [
            (
                "worker commit -> client, p50 ms",
                f"{p50:.1f}",
                f"< {TARGET_P50_MS:.0f}",
                met(p50 < TARGET_P50_MS),
            ),
            (
                "worker commit -> client, p99 ms",
                f"{p99:.1f}",
                f"< {TARGET_P99_MS:.0f}",
                met(p99 < TARGET_P99_MS),
            ),
            ("worker commit -> client, max ms", f"{max(r.latencies_ms):.1f}", "", ""),
            (
                "first client of a job, p50 / p99 ms",
                f"{percentile(r.first_ms, 0.5):.1f} / {percentile(r.first_ms, 0.99):.1f}",
                "",
                "",
            ),
            (
                "last - first client of a job, p50 / p99 ms",
                f"{percentile(r.spread_ms, 0.5):.1f} / {percentile(r.spread_ms, 0.99):.1f}",
                "",
                "",
            ),
            (
                "this process's loop lag, p50 / p99 ms",
                f"{percentile(r.loop_lag_ms, 0.5):.1f} / {percentile(r.loop_lag_ms, 0.99):.1f}",
                "",
                "",
            ),
            ("(client, job) pairs", f"{len(r.latencies_ms)}", "", ""),
        ]
        header = ("figure", "value", "target", "met")

        def listed(values: list[float]) -> str:
            return ", ".join(f"{v:.1f}" for v in values)

        return [
            "",
            f"bench live, {time.strftime('%Y-%m-%d %H:%M')}: {self.clients} websocket clients "
            f"on /ws/events, {self.jobs} {PIPELINE} jobs x {self.rounds} rounds, one every "
            f"{self.interval_s:.2f} s; one daphne, one qcluster ({self.workers} workers), "
            "rate limit lifted",
            f"{os.cpu_count()} cores, load average {r.load_before:.2f} before, "
            f"{r.load_after:.2f} after",
            *table_lines(header, rows),
            f"rounds: p50 ms {listed(r.round_p50_ms)}; p99 ms {listed(r.round_p99_ms)}",
            f"messages received by all clients in the rounds {r.messages} "
            f"({r.messages / r.measured_s:.0f}/s); POST /v1/jobs p50 "
            f"{statistics.median(r.submit_ms):.1f} ms; audit rows of the bench key "
            f"{r.audit_rows}",
        ]
