"""The `soak` suite of `manage.py bench`: the whole platform under a steady load for
ten minutes, and the memory of every one of its processes (docs/benchmarks.md).

The processes are those `manage.py serve` (`make run`) starts, on the suite's database,
each started by the helpers the other suites use: daphne (`omniva.bench.events.Server`),
`grpcserver`, one `qcluster` per queue of `OMNIVA_QUEUES` (`omniva.bench.queue.Cluster`:
`default` and `gpu`), and an engine process (`run_engine --type echo`). Every one is an
omniva.processes.ManagedProcess (its own process group, dying with this one); daphne
with the rate limit lifted, as in the other suites.

Before the clock starts, one job of each pipeline of the mix goes through, so that
what each path loads once (imports, the gpu worker's model, caches) is loaded. Then,
for the warm-up (60 s) and the soak (600 s), this process holds a steady load:

- jobs submitted with `POST /v1/jobs` at a fixed rate (4/s), in turn `noop`,
  `fan_out_fan_in` (width 4: six stages), `engine_echo` (an event for the engine),
  `fail_n_times` with no retries (fails, as it should) and `embed_texts` (the gpu
  queue); each with an idempotency key of the run, by which the drain finds them;
- websocket clients (10) on `/ws/events`, each of which must see every job's final
  `job:update`;
- API reads (2/s), in turn: the job list, one job, `/v1/health`, `/v1/metrics`,
  Prometheus `/metrics` and the gRPC `GetTaskStatus`.

Every few seconds (5) the RSS and open file descriptors of every process are sampled
with psutil: each started process and every process under it (a qcluster's sentinel,
workers, monitor and pusher, named from the status the cluster itself reports). A
process's growth is its RSS at the end of the soak minus its RSS at the end of the
warm-up; it fails the suite when it is over max(64 MiB, 25% of that warm-up RSS). A
process that exits during the soak fails it too (a crash, or a recycled worker that
would hide a leak). When the soak ends the load stops and every job must reach its
final status within the drain (180 s), with the status its pipeline should end in, and
every websocket client must have seen it: jobs lost, unexpected outcomes, missed
updates and API errors are all 0, or the suite fails. The table is printed either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from engines.models import EngineInstance
from jobs.grpc.service import orchestrator_pb2, orchestrator_pb2_grpc
from jobs.models import FINISHED_STATUSES, Job
from omniva import services
from omniva.bench.events import READY_TIMEOUT_S, Client, Server, Tally
from omniva.bench.harness import HOST, BenchError, suite_env, table_lines
from omniva.bench.queue import Cluster
from omniva.models import Activity, ApiKey, AuditRecord, Scope
from omniva.processes import ManagedProcess, accepts_connections, free_port, manage_argv

MIB = 1024 * 1024
SOAK_S = 600.0
WARMUP_S = 60.0
SAMPLE_S = 5.0
RATE_PER_S = 4.0
WS_CLIENTS = 10
READS_PER_S = 2.0
DRAIN_TIMEOUT_S = 180.0
# The first job of each pipeline also waits for every worker to start (the gpu
# worker loads its model first).
PRIME_TIMEOUT_S = 300.0
# A process fails the soak when its RSS grew by more than the larger of these, from
# the end of the warm-up to the end of the soak. The floor is for small processes,
# whose allocator arenas and caches move by tens of MiB under load; the fraction for
# large ones (the gpu worker holds torch and a model).
GROWTH_BOUND_MIB = 64
GROWTH_BOUND_FRACTION = 0.25
# The trend (a least-squares slope) says little over a shorter window.
TREND_MIN_WINDOW_S = 60.0
ENGINE_TYPE = "echo"
# Seconds of each engine long poll: a stop waits for it, and must end within the
# suites' stop grace.
ENGINE_WAIT_S = 5
OPEN_TIMEOUT_S = 30.0
CONNECTING_AT_ONCE = 10
POLL_S = 0.5
GRPC_TIMEOUT_S = 30.0
HTTP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Kind:
    """One pipeline of the mix: what is submitted and the status it must end in."""

    pipeline: str
    params: dict[str, Any]
    ends: str
    max_retries: int | None = None


MIX = (
    Kind("noop", {}, "completed"),
    Kind("fan_out_fan_in", {"width": 4}, "completed"),
    Kind("engine_echo", {"message": "soak"}, "completed"),
    Kind("fail_n_times", {"n": 1}, "failed", max_retries=0),
    Kind("embed_texts", {"texts": ["a steady load for ten minutes"]}, "completed"),
)
EXPECTED = {kind.pipeline: kind.ends for kind in MIX}


def growth_bound(warm_rss: int) -> int:
    """The most a process whose RSS was `warm_rss` at the end of the warm-up may grow."""
    return max(GROWTH_BOUND_MIB * MIB, int(warm_rss * GROWTH_BOUND_FRACTION))


def mib(value: float) -> str:
    return f"{value / MIB:.1f}"


# --- the processes --------------------------------------------------------------------------


class GrpcServer(ManagedProcess):
    """`manage.py grpcserver`, as `manage.py serve` starts it, on its own port."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.port = free_port()
        argv = manage_argv("grpcserver", "--host", HOST, "--port", str(self.port))
        super().__init__(argv, env=suite_env(database_url), log_path=log_path, name="grpcserver")

    def wait_ready(self) -> None:
        self.wait_until(
            lambda: accepts_connections(self.port), what="listen", timeout_s=READY_TIMEOUT_S
        )


class Engine(ManagedProcess):
    """`manage.py run_engine --type echo` against the suite's server, its key in the
    environment (not on the command line)."""

    def __init__(
        self, database_url: str, log_path: Path, *, url: str, secret: str, name: str
    ) -> None:
        self.engine_name = name
        argv = manage_argv(
            "run_engine",
            "--type", ENGINE_TYPE, "--url", url, "--name", name,
            "--wait-s", str(ENGINE_WAIT_S),
        )  # fmt: skip
        env = suite_env(database_url, OMNIVA_ENGINE_KEY=secret)
        super().__init__(argv, env=env, log_path=log_path, name="the engine")

    def wait_ready(self) -> None:
        """Until the engine has registered."""
        self.wait_until(
            lambda: EngineInstance.objects.filter(name=self.engine_name).exists(),
            what="register",
            timeout_s=READY_TIMEOUT_S,
        )


# --- the memory samples ---------------------------------------------------------------------


@dataclass
class Track:
    """One OS process: its samples, in seconds since the load started."""

    label: str
    pid: int
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    gone_at: float | None = None

    def index_at(self, at: float) -> int | None:
        """The first sample taken at `at` or later."""
        return next((i for i, t in enumerate(self.times) if t >= at), None)


@dataclass
class Verdict:
    track: Track
    warm: int  # RSS at the end of the warm-up (or at its first sample, if it came later)
    peak: int
    end: int
    bound: int
    trend_mib_per_h: float | None
    started_late: bool
    exited: bool

    @property
    def growth(self) -> int:
        return self.end - self.warm

    @property
    def failed(self) -> bool:
        return self.exited or self.growth > self.bound

    def why(self) -> str:
        label = f"{self.track.label} (pid {self.track.pid})"
        if self.exited:
            assert self.track.gone_at is not None
            return f"{label} exited {self.track.gone_at:.0f} s into the load"
        return (
            f"{label} grew {mib(self.growth)} MiB ({100 * self.growth / self.warm:+.0f}%) "
            f"from {mib(self.warm)} MiB, over its bound of {mib(self.bound)} MiB"
        )


def judge(track: Track, warmed_at: float, ended_at: float) -> Verdict:
    """A process's figures from the end of the warm-up (`warmed_at`) to the end of the
    soak (`ended_at`); one that appeared later is measured from its first sample."""
    first = track.index_at(warmed_at)
    started_late = first is None or track.times[0] > warmed_at
    if first is None:
        first = len(track.times) - 1
    last = max(i for i, t in enumerate(track.times) if t <= ended_at or i == first)
    window = range(first, last + 1)
    times = [track.times[i] for i in window]
    rss = [track.rss[i] for i in window]
    trend = None
    if len(times) >= 3 and times[-1] - times[0] >= TREND_MIN_WINDOW_S:
        slope = statistics.linear_regression(times, rss).slope  # bytes per second
        trend = slope * 3600 / MIB
    exited = track.gone_at is not None and track.gone_at <= ended_at
    return Verdict(
        track=track,
        warm=rss[0],
        peak=max(rss),
        end=rss[-1],
        bound=growth_bound(rss[0]),
        trend_mib_per_h=trend,
        started_late=started_late,
        exited=exited,
    )


class Sampler:
    """The RSS and descriptors of every process under each root, by (pid, start time)."""

    def __init__(self) -> None:
        self.roots: list[tuple[str, int]] = []
        self.tracks: dict[tuple[int, float], Track] = {}
        # Workers are numbered in the order they were first seen, per cluster: the
        # cluster's own list shifts when it replaces one.
        self.workers_seen: Counter[str] = Counter()

    def add(self, name: str, process: ManagedProcess) -> None:
        assert process.pid is not None, f"{process.name} was not started"
        self.roots.append((name, process.pid))

    @staticmethod
    def cluster_roles() -> dict[int, dict[int, str]]:
        """Per qcluster leader pid: its processes' roles, as the cluster reports them."""
        from django_q.status import Stat

        roles: dict[int, dict[int, str]] = {}
        for stat in Stat.get_all():
            named = {stat.pid: "", getattr(stat, "sentinel", 0): "sentinel"}
            named[getattr(stat, "monitor", 0)] = "monitor"
            named[getattr(stat, "pusher", 0)] = "pusher"
            for pid in getattr(stat, "workers", []) or []:
                named[pid] = "worker"
            named.pop(0, None)
            roles[stat.pid] = named
        return roles

    def sample(self, at: float) -> None:
        roles = self.cluster_roles()
        seen: set[tuple[int, float]] = set()
        for name, root_pid in self.roots:
            try:
                leader = psutil.Process(root_pid)
                members = [leader, *leader.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            named = roles.get(root_pid, {root_pid: ""})
            for member in members:
                try:
                    with member.oneshot():
                        if member.status() == psutil.STATUS_ZOMBIE:
                            continue  # exited, not yet reaped: gone
                        key = (member.pid, member.create_time())
                        rss = member.memory_info().rss
                        fds = member.num_fds()
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
                role = named.get(member.pid, "child" if member.pid != root_pid else "")
                track = self.tracks.get(key)
                if track is None or (track.label.endswith(": child") and role != "child"):
                    # New, or named by its cluster since it was first seen.
                    if role == "worker":
                        self.workers_seen[name] += 1
                        role = f"worker {self.workers_seen[name]}"
                    label = f"{name}: {role}" if role else name
                    if track is None:
                        track = self.tracks[key] = Track(label, member.pid)
                    track.label = label
                track.times.append(at)
                track.rss.append(rss)
                track.fds.append(fds)
                seen.add(key)
        for key, track in self.tracks.items():
            if key not in seen and track.gone_at is None:
                track.gone_at = at

    def total_rss(self) -> int:
        return sum(t.rss[-1] for t in self.tracks.values() if t.gone_at is None and t.rss)


# --- the websocket clients ------------------------------------------------------------------


class Watchers:
    """`clients` websocket clients on /ws/events, on an event loop in a thread of their
    own; each collects the ids of the jobs whose final `job:update` it received."""

    FINAL = {"completed", "failed", "cancelled", "timed_out"}

    def __init__(self, port: int, secret: str, clients: int) -> None:
        self.uri = f"ws://{HOST}:{port}/ws/events?token={secret}"
        self.clients = clients
        self.ended: list[set[str]] = [set() for _ in range(clients)]
        self.messages = 0
        self.closed: dict[int, str] = {}
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="soak-websockets", daemon=True)

    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(OPEN_TIMEOUT_S * 2) or self.error is not None:
            raise BenchError(f"the websocket clients could not connect: {self.error!r}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(OPEN_TIMEOUT_S)

    def check(self) -> None:
        if self.error is not None:
            raise BenchError(f"the websocket clients failed: {self.error!r}")
        if self.closed:
            index, why = next(iter(self.closed.items()))
            raise BenchError(
                f"{len(self.closed)} websocket clients were closed by the server; "
                f"client {index}: {why}"
            )

    def missing(self, job_ids: list[str]) -> int:
        """Final updates not received: one per (client, job)."""
        return sum(job_id not in ended for ended in self.ended for job_id in job_ids)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            self.ready.set()

    async def _run(self) -> None:
        gate = asyncio.Semaphore(CONNECTING_AT_ONCE)

        async def open_one() -> ClientConnection:
            async with gate:
                ws = await connect(self.uri, open_timeout=OPEN_TIMEOUT_S, max_queue=None)
                first = json.loads(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT_S))
                if first.get("type") != "snapshot":
                    raise BenchError(f"the first message is no snapshot: {first}")
                return ws

        try:
            sockets = await asyncio.gather(*(open_one() for _ in range(self.clients)))
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise BenchError(f"a websocket client could not connect: {exc!r}") from exc
        closing = False

        async def listen(index: int, ws: ClientConnection) -> None:
            ended = self.ended[index]
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    self.messages += 1
                    message = json.loads(raw)
                    if message.get("type") != "job:update":
                        continue
                    if (message.get("data") or {}).get("status") in self.FINAL:
                        ended.add(message.get("job_id"))
            if not closing:
                self.closed[index] = f"close code {ws.close_code} {ws.close_reason!r}"

        listeners = [asyncio.create_task(listen(i, ws)) for i, ws in enumerate(sockets)]
        self.ready.set()
        while not self.stop.is_set():
            await asyncio.sleep(0.2)
        closing = True
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)


# --- the suite ------------------------------------------------------------------------------


@dataclass
class Counts:
    submitted: Counter[str] = field(default_factory=Counter)  # per pipeline
    accepted: dict[str, str] = field(default_factory=dict)  # job id -> pipeline
    reads: int = 0
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (pipeline, status)
    lost: int = 0
    unexpected: int = 0
    missed_updates: int = 0
    ws_messages: int = 0
    drained_s: float = 0.0


@dataclass
class SoakBench:
    database_url: str
    work_dir: Path
    soak_s: float = SOAK_S
    warmup_s: float = WARMUP_S
    sample_s: float = SAMPLE_S
    rate_per_s: float = RATE_PER_S
    ws_clients: int = WS_CLIENTS
    reads_per_s: float = READS_PER_S
    workers: int = 2
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    say: Callable[[str], None] = print
    counts: Counts = field(default_factory=Counts)
    errors: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self.run_id = f"soak-{time.time_ns()}"
        # The idempotency keys of the jobs submitted: `<run_id>-prime-<n>`, then
        # `<run_id>-load-<n>`.
        self.key_prefix = f"{self.run_id}-prime"
        self.server: Server | None = None
        self.grpc: GrpcServer | None = None
        self.clusters: list[Cluster] = []
        self.engine: Engine | None = None
        self.watchers: Watchers | None = None
        self.sampler = Sampler()
        self.keys: list[Any] = []
        self.secret = ""
        self.stop_load = threading.Event()
        self.load_threads: list[threading.Thread] = []
        self.thread_errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.last_job_id: str | None = None
        self.verdicts: list[Verdict] = []
        self.load_before = self.load_after = 0.0

    # --- setup and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        from django.conf import settings

        key, self.secret = services.api_key_create(
            name=f"bench-{self.run_id}", scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE]
        )
        engine_key, engine_secret = services.api_key_create(
            name=f"bench-{self.run_id}-engine", scopes=[Scope.ENGINES]
        )
        self.keys = [key, engine_key]
        self.server = Server(self.database_url, self.work_dir / "daphne.log")
        self.server.start()
        self.sampler.add("daphne", self.server)
        self.grpc = GrpcServer(self.database_url, self.work_dir / "grpcserver.log")
        self.grpc.start()
        self.sampler.add("grpcserver", self.grpc)
        for queue in settings.OMNIVA_QUEUES:
            cluster = Cluster(
                queue=queue,
                workers=self.workers,
                database_url=self.database_url,
                log_path=self.work_dir / f"qcluster-{queue}.log",
            )
            self.clusters.append(cluster)
            cluster.start()
            self.sampler.add(f"qcluster {queue}", cluster)
        self.server.wait_ready()
        self.grpc.wait_ready()
        self.engine = Engine(
            self.database_url,
            self.work_dir / "engine.log",
            url=f"http://{HOST}:{self.server.port}",
            secret=engine_secret,
            name=f"{self.run_id}-echo",
        )
        self.engine.start()
        self.sampler.add(f"run_engine {ENGINE_TYPE}", self.engine)
        self.engine.wait_ready()

    def teardown(self) -> None:
        self._stop_load()
        if self.watchers is not None:
            self.watchers.close()
            self.watchers = None
        # The engine first: it deregisters through the server.
        for process in [self.engine, *self.clusters, self.grpc, self.server]:
            if process is not None:
                process.stop()
        self.engine = self.grpc = self.server = None
        self.clusters = []
        # With DATABASE_URL the suite runs in a database that is kept.
        jobs = Job.objects.filter(idempotency_key__startswith=f"{self.run_id}-")
        job_ids = list(jobs.values_list("pk", flat=True))
        Activity.objects.filter(job_id__in=job_ids).delete()
        jobs.delete()
        EngineInstance.objects.filter(name__startswith=self.run_id).delete()
        for key in self.keys:
            AuditRecord.objects.filter(api_key=key).delete()
            ApiKey.objects.filter(pk=key.pk).delete()
        self.keys = []

    def check_alive(self) -> None:
        for process in [self.server, self.grpc, *self.clusters, self.engine]:
            if process is not None:
                process.check_alive()
        if self.watchers is not None:
            self.watchers.check()
        if self.thread_errors:
            raise BenchError(f"a load thread failed: {self.thread_errors[0]!r}")

    # --- the load -------------------------------------------------------------------------

    def _loop(self, per_s: float, step: Callable[[int], object]) -> Callable[[], None]:
        """A thread's body: `step(n)` at a fixed rate until the load stops."""

        def body() -> None:
            started = time.monotonic()
            number = 0
            try:
                while not self.stop_load.is_set():
                    delay = started + number / per_s - time.monotonic()
                    if delay > 0 and self.stop_load.wait(delay):
                        break
                    step(number)
                    number += 1
            except BaseException as exc:  # reported by the main thread
                self.thread_errors.append(exc)

        return body

    def submit(self, client: Client, number: int) -> str | None:
        kind = MIX[number % len(MIX)]
        body: dict[str, Any] = {
            "pipeline": kind.pipeline,
            "params": kind.params,
            "idempotency_key": f"{self.key_prefix}-{number}",
        }
        if kind.max_retries is not None:
            body["max_retries"] = kind.max_retries
        with self.lock:
            self.counts.submitted[kind.pipeline] += 1
        data = client.call("POST", "/v1/jobs", body)
        if data is None:
            return None
        with self.lock:
            self.counts.accepted[data["id"]] = kind.pipeline
            self.last_job_id = data["id"]
        return data["id"]

    def _read(self, client: Client, grpc_call: Callable[[str], Any], number: int) -> None:
        job_id = self.last_job_id
        which = number % 6
        if which == 0:
            client.call("GET", "/v1/jobs?limit=20")
        elif which == 1 and job_id:
            client.call("GET", f"/v1/jobs/{job_id}")
        elif which == 2:
            client.call("GET", "/v1/health")
        elif which == 3:
            client.call("GET", "/v1/metrics")
        elif which == 4:
            self._prometheus(client)
        elif which == 5 and job_id:
            try:
                grpc_call(job_id)
            except Exception as exc:
                self.errors.add(f"gRPC GetTaskStatus: {exc!r}")
        with self.lock:
            self.counts.reads += 1

    def _prometheus(self, client: Client) -> None:
        """GET /metrics: Prometheus text, not an envelope."""
        try:
            client.connection.request("GET", "/metrics")
            response = client.connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            client.connection.close()
            self.errors.add(f"GET /metrics: {exc.__class__.__name__}: {exc}")
            return
        if response.status != 200 or b"omniva_" not in raw:
            self.errors.add(f"GET /metrics: {response.status} {raw[:300]!r}")

    def start_load(self) -> None:
        import grpc

        assert self.server is not None
        assert self.grpc is not None
        port = self.server.port
        submitter = Client(port, self.secret, self.errors)
        reader = Client(port, self.secret, self.errors)
        channel = grpc.insecure_channel(f"{HOST}:{self.grpc.port}")
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        metadata = [("x-api-key", self.secret)]

        def grpc_call(job_id: str) -> Any:
            request = orchestrator_pb2.TaskStatusRequest(task_id=job_id)
            return stub.GetTaskStatus(request, metadata=metadata, timeout=GRPC_TIMEOUT_S)

        def submit_body() -> None:
            try:
                self._loop(self.rate_per_s, lambda n: self.submit(submitter, n))()
            finally:
                submitter.close()

        def read_body() -> None:
            try:
                self._loop(self.reads_per_s, lambda n: self._read(reader, grpc_call, n))()
            finally:
                reader.close()
                channel.close()

        self.load_threads = [
            threading.Thread(target=submit_body, name="soak-submit", daemon=True),
            threading.Thread(target=read_body, name="soak-read", daemon=True),
        ]
        for thread in self.load_threads:
            thread.start()

    def _stop_load(self) -> None:
        self.stop_load.set()
        for thread in self.load_threads:
            thread.join(HTTP_TIMEOUT_S)
        self.load_threads = []

    # --- the phases -----------------------------------------------------------------------

    def prime(self) -> None:
        """One job of each pipeline, each to its end, before the clock starts."""
        assert self.server is not None
        self.say(f"priming: one job of each pipeline ({', '.join(EXPECTED)})")
        started = time.monotonic()
        client = Client(self.server.port, self.secret, self.errors)
        try:
            job_ids = [self.submit(client, number) for number in range(len(MIX))]
        finally:
            client.close()
        if None in job_ids:
            raise BenchError(f"a first submission failed: {self.errors.samples}")
        self.key_prefix = f"{self.run_id}-load"
        self._wait_ended([j for j in job_ids if j], PRIME_TIMEOUT_S, "priming")
        self.say(f"  every one ended in {time.monotonic() - started:.1f} s")
        self.counts = Counts()

    def _wait_ended(self, job_ids: list[str], timeout_s: float, during: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            open_ids = list(
                Job.objects.filter(pk__in=job_ids)
                .exclude(status__in=FINISHED_STATUSES)
                .values_list("pipeline", flat=True)
            )
            if not open_ids:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{len(open_ids)} jobs ({', '.join(sorted(set(open_ids)))}) not ended "
                    f"{timeout_s:.0f} s into {during}"
                )
            time.sleep(POLL_S)

    def soak(self) -> None:
        """The warm-up and the soak under load, sampling every process."""
        assert self.server is not None
        self.watchers = Watchers(self.server.port, self.secret, self.ws_clients)
        self.watchers.start()
        total = self.warmup_s + self.soak_s
        ticks = sorted(
            {round(i * self.sample_s, 3) for i in range(int(total / self.sample_s) + 1)}
            | {self.warmup_s, total}
        )
        self.say(
            f"load: {self.rate_per_s:g} jobs/s, {self.ws_clients} websocket clients, "
            f"{self.reads_per_s:g} reads/s; warm-up {self.warmup_s:.0f} s, "
            f"soak {self.soak_s:.0f} s, a sample every {self.sample_s:g} s"
        )
        self.start_load()
        started = time.monotonic()
        with tqdm(
            total=round(total),
            desc="bench soak",
            unit="s",
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=False,
            ncols=100,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s{postfix}",
        ) as bar:
            for tick in ticks:
                delay = started + tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.check_alive()
                self.sampler.sample(tick)
                phase = "warm-up" if tick < self.warmup_s else "soak"
                with self.lock:
                    accepted = len(self.counts.accepted)
                bar.n = round(tick)
                bar.set_postfix_str(
                    f"{phase}, {accepted} jobs, RSS {mib(self.sampler.total_rss())} MiB",
                    refresh=False,
                )
                bar.refresh()
        self._stop_load()

    def drain(self) -> None:
        """Every accepted job to its end, and its final update to every client."""
        assert self.watchers is not None
        started = time.monotonic()
        deadline = started + self.drain_timeout_s
        ours = Job.objects.filter(idempotency_key__startswith=f"{self.key_prefix}-")
        job_ids = list(self.counts.accepted)
        self.say(f"draining: {len(job_ids)} jobs")
        while time.monotonic() < deadline:
            self.check_alive()
            if not ours.exclude(status__in=FINISHED_STATUSES).exists() and not (
                self.watchers.missing(job_ids)
            ):
                break
            time.sleep(POLL_S)
        self.counts.drained_s = time.monotonic() - started
        c = self.counts
        statuses = {str(pk): status for pk, status in ours.values_list("pk", "status")}
        for job_id, pipeline in c.accepted.items():
            status = statuses.get(job_id, "missing")
            c.outcomes[(pipeline, status)] += 1
            if status == "missing" or status not in FINISHED_STATUSES:
                c.lost += 1
            elif status != EXPECTED[pipeline]:
                c.unexpected += 1
        c.missed_updates = self.watchers.missing(job_ids)
        c.ws_messages = self.watchers.messages

    def run(self) -> None:
        self.load_before = os.getloadavg()[0]
        try:
            started = time.monotonic()
            self.say("starting daphne, grpcserver, a qcluster per queue and an engine")
            self.setup()
            self.say(f"  every process ready in {time.monotonic() - started:.1f} s")
            self.prime()
            self.soak()
            self.drain()
        finally:
            started = time.monotonic()
            self.teardown()
            self.say(f"every process stopped, rows deleted in {time.monotonic() - started:.1f} s")
        self.load_after = os.getloadavg()[0]
        total = self.warmup_s + self.soak_s
        self.verdicts = [
            judge(track, self.warmup_s, total)
            for track in sorted(self.sampler.tracks.values(), key=lambda t: (t.label, t.pid))
        ]

    # --- the verdict and the table --------------------------------------------------------

    def failures(self) -> list[str]:
        c = self.counts
        found = [v.why() for v in self.verdicts if v.failed]
        if c.lost:
            found.append(f"{c.lost} jobs lost (not ended {self.drain_timeout_s:.0f} s after)")
        if c.unexpected:
            found.append(f"{c.unexpected} jobs ended in a status their pipeline should not")
        if c.missed_updates:
            found.append(f"{c.missed_updates} final job updates missed by websocket clients")
        if self.errors.count:
            found.append(f"{self.errors.count} API errors, e.g. {self.errors.samples[:3]}")
        return found

    def report(self) -> list[str]:
        c = self.counts
        header = (
            "process",
            "pid",
            "warm-up MiB",
            "max MiB",
            "end MiB",
            "growth MiB",
            "growth %",
            "bound MiB",
            "trend MiB/h",
            "fds",
            "verdict",
        )
        rows = []
        for v in self.verdicts:
            trend = "" if v.trend_mib_per_h is None else f"{v.trend_mib_per_h:+.1f}"
            first = v.track.index_at(self.warmup_s) or 0
            verdict = "EXITED" if v.exited else ("GREW" if v.failed else "ok")
            rows.append(
                (
                    v.track.label + (" (started late)" if v.started_late else ""),
                    str(v.track.pid),
                    mib(v.warm),
                    mib(v.peak),
                    mib(v.end),
                    f"{v.growth / MIB:+.1f}",
                    f"{100 * v.growth / v.warm:+.1f}",
                    mib(v.bound),
                    trend,
                    f"{v.track.fds[first]}->{v.track.fds[-1]}",
                    verdict,
                )
            )
        # The processes running at the end of the warm-up, and those at the end.
        warm = sum(v.warm for v in self.verdicts if not v.started_late)
        end = sum(v.end for v in self.verdicts if not v.exited)
        rows.append(
            ("all (RSS summed)", "", mib(warm), "", mib(end), f"{(end - warm) / MIB:+.1f}")
            + ("",) * 5
        )
        submitted = sum(c.submitted.values())
        pipeline_rows = [
            (
                kind.pipeline,
                str(c.submitted[kind.pipeline]),
                kind.ends,
                ", ".join(
                    f"{status} {n}"
                    for (pipeline, status), n in sorted(c.outcomes.items())
                    if pipeline == kind.pipeline
                ),
            )
            for kind in MIX
        ]
        failures = self.failures()
        verdict = (
            "verdict: FAIL: " + "; ".join(failures)
            if failures
            else "verdict: pass: no process grew over its bound or exited, no job lost"
        )
        return [
            "",
            f"bench soak, {time.strftime('%Y-%m-%d %H:%M')}: {self.soak_s:.0f} s after a "
            f"{self.warmup_s:.0f} s warm-up; {self.rate_per_s:g} jobs/s over HTTP, "
            f"{self.ws_clients} websocket clients on /ws/events, {self.reads_per_s:g} API "
            f"reads/s; daphne, grpcserver, one qcluster per queue ({self.workers} default "
            f"workers), an {ENGINE_TYPE} engine; RSS sampled every {self.sample_s:g} s",
            f"{os.cpu_count()} cores, load average {self.load_before:.2f} before, "
            f"{self.load_after:.2f} after; bound: growth over max({GROWTH_BOUND_MIB} MiB, "
            f"{100 * GROWTH_BOUND_FRACTION:.0f}% of the warm-up RSS) fails",
            *table_lines(header, rows),
            "",
            *table_lines(("pipeline", "submitted", "must end", "ended"), pipeline_rows),
            f"jobs: submitted {submitted}, accepted {len(c.accepted)}, "
            f"completed {sum(n for (_, s), n in c.outcomes.items() if s == 'completed')}, "
            f"failed {sum(n for (_, s), n in c.outcomes.items() if s == 'failed')}, "
            f"jobs_lost {c.lost}, unexpected {c.unexpected} (drained in {c.drained_s:.1f} s)",
            f"websocket messages {c.ws_messages}, final updates missed {c.missed_updates}; "
            f"API reads {c.reads}; API errors {self.errors.count}",
            verdict,
        ]
