"""The `web` suite of `manage.py bench`: Omniva's web tier against a bare Django view, in one run.

Both servers are started by the suite, on the suite's database, one after the other
(the reference first, stopped before Omniva starts), and measured by the same load
generator: `wrk`, 2 threads, 32 connections, `--duration` seconds per path after one
second of warm-up, with a Lua script that sets the method, the body, the API key and
prints wrk's summary in a line this module parses. A rate is what was answered 2xx per
second; answers outside 2xx and socket errors are listed beside it.

- **The reference** (omniva/bench/reference/): a bare DRF view running `SELECT 1`,
  served by gunicorn with 2 x cores sync workers and persistent connections
  (CONN_MAX_AGE) on Omniva's DATABASES: the setup a Django user would pick.
- **Omniva as `manage.py serve` runs it**: `serve --port P --grpc-port 0 --queues
  default`, the environment passed through (OMNIVA_WEB_PROCESSES and the rest), with a
  rate limit high enough never to refuse the benchmark (the check itself still runs)
  and a var folder of its own in the work folder (serve would otherwise write the
  first admin's password of the suite's database over var/admin-password). It is
  stopped with SIGTERM. An API key (jobs:read, jobs:write, engines) is made with
  omniva.services. Measured with wrk: `GET /v1/jobs/{id}` (a noop job submitted
  first), `GET /v1/health`, `POST /v1/jobs` with `{"pipeline": "noop"}`; the `default`
  worker then drains what the POSTs queued before the next phase starts.
- **Engine events claimed and completed per second**: `--events` events of a type of
  the suite's own are queued with engines.services.event_create in one transaction;
  `--clients` engine threads (registered engines, one keep-alive http.client
  connection each) claim batches of 10 (`POST /v1/events/claim`) and report each
  batch (a) event by event (`PUT /v1/events/{id}/status`, seed 000's path) and (b) in
  one request (`PUT /v1/events/status`, a list of `{id, status, result, lease_token}`),
  until the queue is empty or `--duration` passed. Events/s are the events the
  database holds as completed over the time the clients ran; the HTTP requests/s it
  took are printed beside them.
- **`--waiters` concurrent sync waiters** (1,000): as many asyncio clients (raw
  streams, one connection each, all opened at once) send `POST /v1/jobs` with
  `{"pipeline": "engine_echo", "sync": true, "sync_timeout_s": --sync-timeout-s}`.
  The `engine_echo` stage runs on an external engine of type `echo`, and none runs:
  the jobs are queued as events that nobody claims, so every submitter really waits,
  which is what a sync submission does while its engine is busy or away. Once every
  job exists (or every waiter has been answered, or half the sync timeout passed),
  the waiters are left parked for 2 s; then `--clients` engine threads of this
  process start claiming `echo` events and completing them (batched reports when that
  endpoint worked above, else per event) with what the echo engine would return, so
  the waiters are answered as their jobs complete: 200 when the job finished within
  its sync timeout, 202 when it did not. Measured: answers by status code (200, 202,
  503, other, socket errors or no answer), the client backends of the database in
  pg_stat_activity (sampled every 0.2 s: before, while parked, over the whole wait),
  and `GET /v1/health` probed every 50 ms on a keep-alive connection of its own, idle
  before the waiters and during the whole wait (p50, p99).

The targets of issue 18 are printed as met / not met; a target not met is a finding,
not a failure. The suite fails (after its tables) only where it could not measure: a
server that did not start or died, wrk missing, the events of a mode not completed.
Every process it starts (gunicorn, serve, wrk) is stopped on the way out, on an error
or Ctrl-C too. With DATABASE_URL the suite runs in that database and deletes what it
made (jobs, events, engines, its key and that key's audit rows) at the end, and its
connection counts include every other client of that database.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines import services as engine_services
from engines.models import EngineInstance, Event, EventStatus, EventType
from jobs.models import FINISHED_STATUSES, Job
from omniva import services as core_services
from omniva.bench.events import ApiClient, Tally
from omniva.bench.harness import HOST, BenchError, SuiteFailed, percentile, suite_env, table_lines
from omniva.bench.reference.urls import PATH
from omniva.models import Activity, ApiKey, AuditRecord, Scope
from omniva.processes import ManagedProcess, die_with_parent, free_port, manage_argv

WRK_THREADS = 2
WRK_CONNECTIONS = 32
WRK_TIMEOUT_S = 10
WARMUP_S = 1
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 60.0
EVENT_TYPE = "bench_web"  # the events phase's event type and engine type
ECHO_ENGINE_TYPE = "echo"  # what the engine_echo pipeline's stage waits for
BATCH_SIZE = 10
DRAIN_TIMEOUT_S = 120.0  # for the default worker to run what the POSTs queued
BASELINE_S = 2.0  # the probe and the connection count before the waiters
PARKED_S = 2.0  # waiters left parked before the engines start
PROBE_INTERVAL_S = 0.05
SAMPLE_INTERVAL_S = 0.2
CONNECT_TIMEOUT_S = 30.0
ERROR_SAMPLES = 3
# Never refuse the benchmark's own requests (the check itself still runs).
SERVER_RATE_ENV = {"OMNIVA_RATE_LIMIT": "1000000000", "OMNIVA_RATE_BURST": "1000000000"}

# Issue 18's targets, ratios to the reference's req/s within one run.
TARGET_GET_RATIO = 0.5
TARGET_POST_RATIO = 0.3
TARGET_EVENTS_RATIO = 1.0
TARGET_PROBE_P99_MS = 200.0
# "Connections held by waiters constant": the most the parked count may exceed the
# count before the waiters by (a pool growing under the burst, not one per waiter).
WAITER_CONNECTION_SLACK = 10

# Prints wrk's summary as one line: requests, duration (µs), socket errors (connect,
# read, write, timeout), answers outside 2xx/3xx, latency p50 and p99 (µs).
WRK_SCRIPT = """\
wrk.method = {method}
wrk.body = {body}
wrk.headers["Accept"] = "application/json"
wrk.headers["Content-Type"] = "application/json"
{auth}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d %d %d %d %.0f %.0f\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


# --- the servers ------------------------------------------------------------------------------


class Reference(ManagedProcess):
    """gunicorn serving the reference app, 2 x cores sync workers."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.workers = 2 * (os.cpu_count() or 1)
        self.port = free_port()
        argv = [
            sys.executable, "-m", "gunicorn",
            "--workers", str(self.workers), "--worker-class", "sync",
            "--bind", f"{HOST}:{self.port}", "--log-level", "warning",
            "omniva.bench.reference.wsgi:application",
        ]  # fmt: skip
        env = suite_env(database_url, DJANGO_SETTINGS_MODULE="omniva.bench.reference.settings")
        super().__init__(argv, env=env, log_path=log_path, name="gunicorn (the reference)")

    def wait_ready(self) -> None:
        self.wait_answering(self.port, PATH, status=200, timeout_s=READY_TIMEOUT_S)


class Serve(ManagedProcess):
    """`manage.py serve` as `make run` starts it: no gRPC, a `default` worker only."""

    def __init__(self, database_url: str, log_path: Path, var_dir: Path) -> None:
        from django.conf import settings

        self.port = free_port()
        argv = manage_argv(
            "serve",
            "--host", HOST, "--port", str(self.port), "--grpc-port", "0", "--queues", "default",
        )  # fmt: skip
        env = suite_env(
            database_url,
            **SERVER_RATE_ENV,
            OMNIVA_VAR_DIR=str(var_dir),
            # The var folder holds the generated secret key: keep this process's, so
            # that what serve and the suite sign agrees.
            SECRET_KEY=settings.SECRET_KEY,
        )
        super().__init__(argv, env=env, log_path=log_path, name="manage.py serve")

    def wait_ready(self) -> None:
        self.wait_answering(self.port, "/v1/health", status=200, timeout_s=READY_TIMEOUT_S)


# --- wrk --------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    label: str
    requests: int = 0
    duration_s: float = 0.0
    socket_errors: int = 0
    non_2xx: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def rate(self) -> float:
        """Requests answered 2xx (or 3xx) per second."""
        return (self.requests - self.non_2xx) / self.duration_s if self.duration_s else 0.0


def lua_string(value: str) -> str:
    if not value.isascii():
        raise ValueError("wrk scripts here carry ASCII only")
    return json.dumps(value)  # a JSON string of ASCII is a Lua string


def wrk_script(
    folder: Path, name: str, *, method: str, body: str | None, secret: str | None
) -> Path:
    path = folder / f"wrk-{name}.lua"
    auth = f'wrk.headers["Authorization"] = {lua_string(f"Bearer {secret}")}' if secret else ""
    text = WRK_SCRIPT.format(
        method=lua_string(method),
        body=lua_string(body) if body is not None else "nil",
        auth=auth,
    )
    path.touch(mode=0o600)  # it holds the key
    path.write_text(text)
    return path


def wrk(url: str, script: Path, duration_s: float, *, label: str) -> WrkResult:
    argv = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{WRK_CONNECTIONS}",
        f"-d{max(1, round(duration_s))}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "-s",
        str(script),
        url,
    ]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration_s + WRK_TIMEOUT_S + 30,
            preexec_fn=die_with_parent,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk on {url} did not finish") from exc
    for line in done.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            fields = line.split()[1:]
            requests, duration_us, connect, read, write, timeout, status = map(int, fields[:7])
            return WrkResult(
                label=label,
                requests=requests,
                duration_s=duration_us / 1e6,
                socket_errors=connect + read + write + timeout,
                non_2xx=status,
                p50_ms=float(fields[7]) / 1000,
                p99_ms=float(fields[8]) / 1000,
            )
    raise BenchError(
        f"wrk on {url} exited with code {done.returncode} and no summary:\n"
        + (done.stdout + done.stderr)[-2000:]
    )


# --- engine clients (threads, one keep-alive connection each) ----------------------------------


class EngineClient(ApiClient):
    """An engine of `engine_type`: claims batches and reports them, one by one or at once."""

    def __init__(self, port: int, secret: str, errors: Tally, engine_type: str) -> None:
        super().__init__(port, secret, errors)
        self.engine_type = engine_type
        self.engine_id: str | None = None

    def register(self, name: str) -> None:
        engine = self.call(
            "POST", "/v1/engine-instances", {"engine_type": self.engine_type, "name": name}
        )
        if engine is None:
            raise BenchError(f"registering engine {name} failed: {self.errors.samples[-1:]}")
        self.engine_id = engine["id"]

    def claim(self) -> list[dict[str, Any]] | None:
        body = {"engine_type": self.engine_type, "batch_size": BATCH_SIZE}
        if self.engine_id:
            body["engine_id"] = self.engine_id
        return self.call("POST", "/v1/events/claim", body)

    @staticmethod
    def result(event: dict[str, Any]) -> dict[str, Any]:
        """What the `echo` engine returns (engines/handlers.py) for a stage's event."""
        params = (event.get("data") or {}).get("params") or {}
        return {"echo": params.get("message")}

    def report_each(self, events: list[dict[str, Any]]) -> int:
        """One `PUT /v1/events/{id}/status` per event; the requests sent."""
        for event in events:
            body = {
                "status": "completed",
                "lease_token": event["lease_token"],
                "result": self.result(event),
            }
            self.call("PUT", f"/v1/events/{event['id']}/status", body)
        return len(events)

    def report_batch(self, events: list[dict[str, Any]]) -> int:
        """One `PUT /v1/events/status` for the whole batch; the requests sent."""
        items = [
            {
                "id": event["id"],
                "status": "completed",
                "result": self.result(event),
                "lease_token": event["lease_token"],
            }
            for event in events
        ]
        answers = self.call("PUT", "/v1/events/status", items)
        for answer in answers if isinstance(answers, list) else []:
            if isinstance(answer, dict) and answer.get("ok") is False:
                self.errors.add(f"PUT /v1/events/status: item refused: {answer}")
        return 1


Work = Callable[[EngineClient, threading.Event], int]


def run_engines(clients: list[EngineClient], work: Work, stop: threading.Event) -> float:
    """Run `work` on every client at once (released together); the seconds from the
    release to the last one's end. `work` returns when it is done or `stop` is set."""
    barrier = threading.Barrier(len(clients) + 1)
    failures: list[BaseException] = []

    def main(client: EngineClient) -> None:
        try:
            barrier.wait()
            work(client, stop)
        except BaseException as exc:  # reported by the caller
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=main, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        started = time.perf_counter()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
        elapsed = time.perf_counter() - started
    finally:
        stop.set()  # on Ctrl-C too: the threads end after their current request
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S)
    if failures:
        raise BenchError(f"an engine thread failed: {failures[0]!r}") from failures[0]
    return elapsed


# --- what the waiters phase watches -------------------------------------------------------------


class Sampler(threading.Thread):
    """Every 0.2 s, on a connection of its own: the database's client backends (others
    than its own) and the `engine_echo` jobs created since it started."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True)
        import psycopg
        from psycopg import sql

        self.connection = psycopg.connect(database_url, autocommit=True)
        self.query = sql.SQL(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()),"
            " (SELECT count(*) FROM {} WHERE pipeline = 'engine_echo' AND created_at >= %s)"
        ).format(sql.Identifier(Job._meta.db_table))
        row = self.connection.execute("SELECT now()").fetchone()
        assert row is not None
        self.since = row[0]
        self.samples: list[tuple[float, int]] = []  # (monotonic time, connections)
        self.jobs_created = 0
        self.stopping = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                row = self.connection.execute(self.query, (self.since,)).fetchone()
                assert row is not None
                self.samples.append((time.monotonic(), int(row[0])))
                self.jobs_created = int(row[1])
                self.stopping.wait(SAMPLE_INTERVAL_S)
        except Exception as exc:  # reported by stop()
            self.failure = exc

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(10)
        self.connection.close()
        if self.failure is not None:
            raise BenchError(f"sampling pg_stat_activity failed: {self.failure!r}")

    def between(self, start: float, end: float) -> list[int]:
        return [count for at, count in self.samples if start <= at <= end]


class Probe(threading.Thread):
    """`GET /v1/health` every 50 ms on a keep-alive connection; (time, ms, status)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, float, int | None]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=REQUEST_TIMEOUT_S)
        try:
            while not self.stopping.is_set():
                started = time.monotonic()
                status: int | None
                try:
                    connection.request("GET", "/v1/health")
                    response = connection.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException):
                    connection.close()
                    status = None
                took = time.monotonic() - started
                self.samples.append((started, took * 1000, status))
                self.stopping.wait(max(0.0, PROBE_INTERVAL_S - took))
        finally:
            connection.close()

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(REQUEST_TIMEOUT_S)

    def between(self, start: float, end: float) -> list[tuple[float, int | None]]:
        return [(ms, status) for at, ms, status in self.samples if start <= at <= end]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    if headers.get(b"transfer-encoding") != b"chunked":
        return status, await reader.read()
    chunks = []
    while size := int((await reader.readline()).split(b";")[0], 16):
        chunks.append(await reader.readexactly(size))
        await reader.readline()
    await reader.readline()
    return status, b"".join(chunks)


@dataclass
class Answer:
    kind: str  # "200", "202", "503", "other", "error"
    at: float  # monotonic
    job_id: str | None = None
    detail: str = ""


async def sync_waiter(port: int, request: bytes, timeout_s: float) -> Answer:
    """One client: its own connection, one sync submission, the answer."""
    writer: asyncio.StreamWriter | None = None
    try:
        reader, opened = await asyncio.wait_for(
            asyncio.open_connection(HOST, port), CONNECT_TIMEOUT_S
        )
        writer = opened
        opened.write(request)
        await opened.drain()
        status, body = await asyncio.wait_for(read_response(reader), timeout_s)
    except (
        OSError,
        TimeoutError,
        EOFError,
        ValueError,
        IndexError,
        asyncio.LimitOverrunError,
    ) as exc:
        return Answer("error", time.monotonic(), detail=f"{exc.__class__.__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    answered = time.monotonic()
    job_id = None
    with contextlib.suppress(ValueError, KeyError, TypeError):
        job_id = str(json.loads(body)["data"]["id"])
    kind = str(status) if status in (200, 202, 503) else "other"
    detail = f"{status} {body[:200]!r}" if kind == "other" else ""
    return Answer(kind, answered, job_id, detail=detail)


# --- the measurements -------------------------------------------------------------------------


@dataclass
class EventsResult:
    label: str
    events: int = 0
    requests: int = 0
    elapsed_s: float = 0.0
    error: str = ""

    @property
    def rate(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def request_rate(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0


@dataclass
class WaitersResult:
    waiters: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    answered_before_release: int = 0
    other_samples: list[str] = field(default_factory=list)
    parked_after_s: float = 0.0
    jobs_at_park: int = 0  # jobs that existed when the waiters were declared parked
    park_timed_out: bool = False
    jobs_created: int = 0
    last_answer_s: float = 0.0
    connections_before: int = 0
    connections_parked: int = 0
    connections_max: int = 0
    probe_idle: list[float] = field(default_factory=list)
    probe_wait: list[float] = field(default_factory=list)
    probe_failures: int = 0
    release: str = ""
    engine_errors: int = 0
    engine_error_samples: list[str] = field(default_factory=list)


@dataclass
class Results:
    reference: WrkResult | None = None
    paths: list[WrkResult] = field(default_factory=list)
    events: list[EventsResult] = field(default_factory=list)
    waiters: WaitersResult | None = None
    drain: str = ""
    load_before: float = 0.0
    load_after: float = 0.0


@dataclass
class WebBench:
    database_url: str
    work_dir: Path
    duration_s: float = 8.0
    clients: int = 4
    events: int = 2000
    waiters: int = 1000
    sync_timeout_s: float = 20.0
    say: Callable[[str], None] = print
    results: Results = field(default_factory=Results)
    errors: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self.run_id = f"bench-web-{uuid.uuid4().hex[:8]}"
        self.reference: Reference | None = None
        self.serve: Serve | None = None
        self.key: Any = None
        self.secret = ""
        self.event_type: Any = None
        self.created_type = False
        self.job_ids: set[str] = set()
        self.engines: list[EngineClient] = []
        self.batched_reports = False
        self.problems: list[str] = []

    # --- the whole suite ----------------------------------------------------------------------

    def run(self) -> Results:
        self.check_tools()
        self.results.load_before = os.getloadavg()[0]
        try:
            self.section("the reference", self.measure_reference)
            if self.section("starting serve", self.start_serve):
                self.section("the paths", self.measure_paths)
                self.section("engine events", self.measure_events)
                self.section("sync waiters", self.measure_waiters)
        finally:
            self.teardown()
        self.results.load_after = os.getloadavg()[0]
        return self.results

    def check_tools(self) -> None:
        import importlib.util

        if shutil.which("wrk") is None:
            raise BenchError("wrk is not installed (Debian: apt-get install wrk)")
        if importlib.util.find_spec("gunicorn") is None:
            raise BenchError("gunicorn is not installed (pip install -r requirements.txt)")
        # Every waiter is a socket of this process.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.waiters + 256
        if soft != resource.RLIM_INFINITY and soft < wanted:
            if hard != resource.RLIM_INFINITY and hard < wanted:
                raise BenchError(
                    f"--waiters {self.waiters} needs {wanted} open files; the limit is {hard}"
                )
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))

    def section(self, name: str, measure: Callable[[], None]) -> bool:
        """Run one part; a part that could not measure is listed after the tables (and
        fails the suite there) instead of hiding what the others measured."""
        try:
            measure()
        except SuiteFailed as exc:
            self.problems.append(f"{name}: {exc}")
            self.say(f"  {name} could not be measured: {exc}")
            return False
        return True

    def failures(self) -> list[str]:
        return list(self.problems)

    # --- the reference ------------------------------------------------------------------------

    def measure_reference(self) -> None:
        self.reference = Reference(self.database_url, self.work_dir / "gunicorn.log")
        self.say(f"reference: gunicorn, {self.reference.workers} sync workers, GET {PATH}")
        self.reference.start()
        try:
            self.reference.wait_ready()
            url = f"http://{HOST}:{self.reference.port}{PATH}"
            script = wrk_script(self.work_dir, "reference", method="GET", body=None, secret=None)
            wrk(url, script, WARMUP_S, label="warm-up")
            label = f"reference: GET {PATH} (gunicorn, {self.reference.workers} sync workers)"
            result = wrk(url, script, self.duration_s, label=label)
            self.reference.check_alive()
        finally:
            self.reference.stop()
            self.reference = None
        self.results.reference = result
        self.say(f"  {result.rate:.0f} req/s")

    # --- Omniva -------------------------------------------------------------------------------

    def start_serve(self) -> None:
        self.key, self.secret = core_services.api_key_create(
            name=self.run_id, scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE, Scope.ENGINES]
        )
        processes = os.environ.get("OMNIVA_WEB_PROCESSES") or "serve's default"
        self.say(f"starting manage.py serve (OMNIVA_WEB_PROCESSES: {processes})")
        (self.work_dir / "var").mkdir(exist_ok=True)
        self.serve = Serve(self.database_url, self.work_dir / "serve.log", self.work_dir / "var")
        self.serve.start()
        self.serve.wait_ready()

    def url(self, path: str) -> str:
        assert self.serve is not None
        return f"http://{HOST}:{self.serve.port}{path}"

    def client(self) -> ApiClient:
        assert self.serve is not None
        return ApiClient(self.serve.port, self.secret, self.errors)

    def check_errors(self, during: str) -> None:
        if self.errors.count:
            count, samples = self.errors.count, self.errors.samples
            self.errors.reset()
            raise BenchError(
                f"{count} requests failed or answered outside 2xx ({during}); first: "
                + " | ".join(samples)
            )

    def submit_one(self) -> str:
        """A noop job through the API, once it finished (or after 30 s): its id."""
        client = self.client()
        try:
            job = client.call("POST", "/v1/jobs", {"pipeline": "noop"})
            self.check_errors("submitting the job GET /v1/jobs/{id} reads")
            job_id = str(job["id"])
            self.job_ids.add(job_id)
            deadline = time.monotonic() + 30
            while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
                time.sleep(0.2)
                job = client.call("GET", f"/v1/jobs/{job_id}") or job
            self.check_errors("reading the job back")
            return job_id
        finally:
            client.close()

    def measure_paths(self) -> None:
        assert self.serve is not None
        job_id = self.submit_one()
        health = wrk_script(self.work_dir, "health", method="GET", body=None, secret=self.secret)
        wrk(self.url("/v1/health"), health, WARMUP_S, label="warm-up")
        runs = [
            ("job", "GET /v1/jobs/{id}", f"/v1/jobs/{job_id}", "GET", None),
            ("health", "GET /v1/health", "/v1/health", "GET", None),
            ("submit", "POST /v1/jobs (noop)", "/v1/jobs", "POST", '{"pipeline": "noop"}'),
        ]
        for name, label, path, method, body in runs:
            script = wrk_script(self.work_dir, name, method=method, body=body, secret=self.secret)
            result = wrk(self.url(path), script, self.duration_s, label=label)
            self.serve.check_alive()
            self.results.paths.append(result)
            self.say(
                f"  {label}: {result.rate:.0f} req/s"
                + (f" ({result.non_2xx} outside 2xx)" if result.non_2xx else "")
            )
        self.drain_default_queue()

    def drain_default_queue(self) -> None:
        """Wait for the default worker to finish the noop jobs the POSTs queued."""
        assert self.serve is not None
        started = time.monotonic()
        deadline = started + DRAIN_TIMEOUT_S
        unfinished = Job.objects.filter(pipeline="noop").exclude(status__in=FINISHED_STATUSES)
        left = unfinished.count()
        while left and time.monotonic() < deadline:
            self.serve.check_alive()
            time.sleep(0.5)
            left = unfinished.count()
        took = time.monotonic() - started
        self.results.drain = (
            f"the default worker ran the POSTs' jobs in {took:.1f} s after the POST run"
            if not left
            else f"{left} noop jobs still unfinished {DRAIN_TIMEOUT_S:.0f} s after the POST run"
        )
        self.say(f"  {self.results.drain}")

    # --- engine events ------------------------------------------------------------------------

    def make_engines(self, engine_type: str) -> list[EngineClient]:
        assert self.serve is not None
        clients = [
            EngineClient(self.serve.port, self.secret, self.errors, engine_type)
            for _ in range(self.clients)
        ]
        self.engines.extend(clients)
        for number, client in enumerate(clients):
            client.register(f"{self.run_id}-{engine_type}-{number}")
        return clients

    def purge_events(self) -> None:
        if self.event_type is not None:
            Event.objects.filter(event_type=self.event_type).delete()

    def queue_events(self) -> None:
        from django.db import connection, transaction

        self.purge_events()
        with transaction.atomic():
            for number in range(self.events):
                engine_services.event_create(event_type=self.event_type, data={"n": number})
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE engines_event")

    def measure_events(self) -> None:
        self.event_type = EventType.objects.filter(name=EVENT_TYPE).first()
        if self.event_type is None:
            self.event_type = engine_services.event_type_create(
                name=EVENT_TYPE, engine_type=EVENT_TYPE
            )
            self.created_type = True
        clients = self.make_engines(EVENT_TYPE)
        self.check_errors("registering engines")
        for label, batched in [
            ("per event: PUT /v1/events/{id}/status", False),
            ("batched: PUT /v1/events/status", True),
        ]:
            result = self.events_mode(clients, label, batched=batched)
            self.results.events.append(result)
            if result.error:
                self.say(f"  {label}: not measured: {result.error}")
            else:
                self.say(
                    f"  {label}: {result.events} events in {result.elapsed_s:.2f} s = "
                    f"{result.rate:.0f}/s ({result.request_rate:.0f} req/s)"
                )
            if batched and not result.error:
                self.batched_reports = True
        self.purge_events()

    def events_mode(
        self, clients: list[EngineClient], label: str, *, batched: bool
    ) -> EventsResult:
        assert self.serve is not None
        self.queue_events()
        deadline = time.monotonic() + self.duration_s
        requests: list[int] = []
        lock = threading.Lock()

        def work(client: EngineClient, stop: threading.Event) -> int:
            sent = 0
            try:
                while not stop.is_set() and time.monotonic() < deadline:
                    events = client.claim()
                    sent += 1
                    if not events:  # the queue is empty, or the claim failed (counted)
                        break
                    report = client.report_batch if batched else client.report_each
                    sent += report(events)
            finally:
                with lock:
                    requests.append(sent)
            return sent

        elapsed = run_engines(clients, work, threading.Event())
        self.serve.check_alive()
        completed = Event.objects.filter(
            event_type=self.event_type, status=EventStatus.COMPLETED
        ).count()
        result = EventsResult(label, completed, sum(requests), elapsed)
        self.purge_events()
        if self.errors.count:
            result.error = (
                f"{self.errors.count} requests failed or answered outside 2xx; first: "
                + " | ".join(self.errors.samples)
            )
            self.errors.reset()
            self.problems.append(f"engine events, {label}: {result.error}")
        elif completed == 0:
            result.error = "no event completed"
            self.problems.append(f"engine events, {label}: no event completed")
        return result

    # --- sync waiters -------------------------------------------------------------------------

    def measure_waiters(self) -> None:
        assert self.serve is not None
        engines = self.make_engines(ECHO_ENGINE_TYPE)
        self.check_errors("registering echo engines")
        result = WaitersResult(waiters=self.waiters)
        result.release = "batched reports" if self.batched_reports else "per-event reports"
        self.say(
            f"waiters: {self.waiters} sync submissions of engine_echo "
            f"(sync_timeout_s {self.sync_timeout_s:g}), released by {len(engines)} engine "
            f"threads ({result.release})"
        )
        sampler = Sampler(self.database_url)
        probe = Probe(self.serve.port)
        stop_engines = threading.Event()
        release = threading.Thread(
            target=self.release_waiters, args=(engines, stop_engines), daemon=True
        )
        marks: dict[str, float] = {}
        answers: list[Answer] = []
        park: dict[str, int] = {}
        try:
            sampler.start()
            probe.start()
            marks["idle"] = time.monotonic()
            time.sleep(BASELINE_S)
            answers = asyncio.run(self.waiters_main(sampler, release, marks, park))
        finally:
            stop_engines.set()
            probe.stop()
            if release.is_alive():
                release.join(REQUEST_TIMEOUT_S)
            sampler.stop()
        self.serve.check_alive()

        # The engines' refusals while the server was saturated: part of the waiters' story.
        result.engine_errors, result.engine_error_samples = self.errors.count, self.errors.samples
        self.errors.reset()
        result.jobs_created = sampler.jobs_created
        for answer in answers:
            result.answers[answer.kind] = result.answers.get(answer.kind, 0) + 1
            if answer.job_id:
                self.job_ids.add(answer.job_id)
            if answer.at < marks["released"]:
                result.answered_before_release += 1
            if answer.detail and len(result.other_samples) < ERROR_SAMPLES:
                result.other_samples.append(f"{answer.kind}: {answer.detail}")
        result.parked_after_s = marks["parked"] - marks["submitted"]
        result.jobs_at_park = park["jobs"]
        result.park_timed_out = bool(park["timed_out"])
        result.last_answer_s = marks["answered"] - marks["submitted"]
        before = sampler.between(marks["idle"], marks["submitted"])
        parked = sampler.between(marks["parked"], marks["released"])
        whole = sampler.between(marks["submitted"], marks["answered"])
        result.connections_before = max(before, default=0)
        result.connections_parked = max(parked, default=0)
        result.connections_max = max(whole, default=0)
        idle = probe.between(marks["idle"], marks["submitted"])
        during = probe.between(marks["submitted"], marks["answered"])
        result.probe_idle = [ms for ms, status in idle if status == 200]
        result.probe_wait = [ms for ms, status in during if status == 200]
        result.probe_failures = sum(1 for _, status in idle + during if status != 200)
        self.results.waiters = result
        self.say(
            "  answers "
            + ", ".join(f"{kind}: {n}" for kind, n in sorted(result.answers.items()))
            + f"; connections {result.connections_before} before, "
            f"{result.connections_parked} parked, {result.connections_max} max"
        )

    async def waiters_main(
        self,
        sampler: Sampler,
        release: threading.Thread,
        marks: dict[str, float],
        park: dict[str, int],
    ) -> list[Answer]:
        assert self.serve is not None
        body = json.dumps(
            {"pipeline": "engine_echo", "sync": True, "sync_timeout_s": self.sync_timeout_s}
        ).encode()
        request = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: {HOST}:{self.serve.port}\r\n"
            f"Authorization: Bearer {self.secret}\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body
        timeout_s = self.sync_timeout_s + REQUEST_TIMEOUT_S
        marks["submitted"] = time.monotonic()
        tasks = [
            asyncio.create_task(sync_waiter(self.serve.port, request, timeout_s))
            for _ in range(self.waiters)
        ]
        # Parked: every submission made its job, or was answered without waiting.
        park_deadline = marks["submitted"] + self.sync_timeout_s / 2
        park["timed_out"] = 1
        while time.monotonic() < park_deadline:
            answered = sum(1 for task in tasks if task.done())
            if sampler.jobs_created + answered >= self.waiters:
                park["timed_out"] = 0
                break
            await asyncio.sleep(0.1)
        marks["parked"] = time.monotonic()
        park["jobs"] = sampler.jobs_created
        await asyncio.sleep(PARKED_S)
        marks["released"] = time.monotonic()
        release.start()
        answers = await asyncio.gather(*tasks)
        marks["answered"] = max((a.at for a in answers), default=time.monotonic())
        return list(answers)

    def release_waiters(self, engines: list[EngineClient], stop: threading.Event) -> None:
        """The echo engine's work, on `engines` threads, until `stop`."""

        def work(client: EngineClient, stop: threading.Event) -> int:
            sent = 0
            while not stop.is_set():
                events = client.claim()
                sent += 1
                if not events:  # nothing yet, or a failed claim (the server is busy)
                    stop.wait(0.05 if events is not None else 0.2)
                    continue
                sent += (client.report_batch if self.batched_reports else client.report_each)(
                    events
                )
            return sent

        with contextlib.suppress(BenchError):  # what it did shows in the answers
            run_engines(engines, work, stop)

    # --- teardown -----------------------------------------------------------------------------

    def teardown(self) -> None:
        for client in self.engines:
            client.close()
        for process in (self.reference, self.serve):
            if process is not None:
                process.stop()
        self.reference = self.serve = None
        # With DATABASE_URL the suite runs in a database that is kept.
        if self.key is not None:
            audit = AuditRecord.objects.filter(api_key=self.key)
            for ids in audit.filter(method="POST", path="/v1/jobs").values_list(
                "entity_ids", flat=True
            ):
                self.job_ids.update(ids)
            job_ids = [job_id for job_id in self.job_ids if is_uuid(job_id)]
            Event.objects.filter(job_id__in=job_ids).delete()
            Activity.objects.filter(job_id__in=job_ids).delete()
            Job.objects.filter(pk__in=job_ids).delete()
            audit.delete()
            ApiKey.objects.filter(pk=self.key.pk).delete()
            self.key = None
        self.purge_events()
        if self.event_type is not None and self.created_type:
            self.event_type.delete()
        self.event_type = None
        EngineInstance.objects.filter(name__startswith=self.run_id).delete()

    # --- the tables ---------------------------------------------------------------------------

    def report(self) -> list[str]:
        r = self.results
        reference = r.reference.rate if r.reference else 0.0

        def ratio(value: float) -> str:
            return f"{value / reference:.2f}x" if reference else "-"

        def met(ok: bool) -> str:
            return "met" if ok else "not met"

        cores = os.cpu_count()
        lines = [
            "",
            f"bench web, {time.strftime('%Y-%m-%d %H:%M')}: wrk {WRK_THREADS} threads, "
            f"{WRK_CONNECTIONS} connections, {self.duration_s:g} s per path; {cores} cores, "
            f"load average {r.load_before:.2f} before, {r.load_after:.2f} after; "
            f"OMNIVA_WEB_PROCESSES {os.environ.get('OMNIVA_WEB_PROCESSES') or 'unset'}",
        ]
        rows = []
        for result in [*([r.reference] if r.reference else []), *r.paths]:
            rows.append(
                (
                    result.label,
                    f"{result.rate:.0f}",
                    f"{result.p50_ms:.1f}",
                    f"{result.p99_ms:.1f}",
                    str(result.non_2xx),
                    str(result.socket_errors),
                    ratio(result.rate),
                )
            )
        lines += table_lines(
            ("path", "req/s", "p50 ms", "p99 ms", "non-2xx", "socket errors", "vs reference"),
            rows,
        )
        if r.drain:
            lines.append(r.drain)

        if r.events:
            lines.append("")
            event_rows = [
                (
                    f"{result.label}",
                    "-" if result.error else f"{result.rate:.0f}",
                    "-" if result.error else f"{result.request_rate:.0f}",
                    "-" if result.error else str(result.events),
                    "-" if result.error else ratio(result.rate),
                )
                for result in r.events
            ]
            lines += table_lines(
                (
                    f"engine events ({self.clients} clients, batch {BATCH_SIZE})",
                    "events/s",
                    "HTTP req/s",
                    "events",
                    "events/s vs reference req/s",
                ),
                event_rows,
            )
            lines += [f"{result.label}: {result.error}" for result in r.events if result.error]

        w = r.waiters
        if w is not None:
            lines.append("")
            counts = {kind: w.answers.get(kind, 0) for kind in ("200", "202", "503", "other")}
            counts["errors"] = w.answers.get("error", 0)
            probe_idle = self._probe_cell(w.probe_idle)
            probe_wait = self._probe_cell(w.probe_wait)
            waiter_rows = [
                ("answers 200 / 202 / 503 / other / errors",
                 " / ".join(str(n) for n in counts.values())),
                ("answered before the engines started", str(w.answered_before_release)),
                ("jobs when the engines started (after) / in all",
                 f"{w.jobs_at_park} ({w.parked_after_s + PARKED_S:.1f} s"
                 + (", the park deadline cut it" if w.park_timed_out else "")
                 + f") / {w.jobs_created}"),
                ("last answer after", f"{w.last_answer_s:.1f} s"),
                ("DB connections before / parked (max) / whole wait (max)",
                 f"{w.connections_before} / {w.connections_parked} / {w.connections_max}"),
                ("probe GET /v1/health p50 / p99 ms, idle before", probe_idle),
                ("probe GET /v1/health p50 / p99 ms, during the wait", probe_wait),
                ("probe requests failed or not 200", str(w.probe_failures)),
                ("engine requests failed or refused while releasing", str(w.engine_errors)),
            ]  # fmt: skip
            lines += table_lines((f"{w.waiters} sync waiters ({w.release})", "value"), waiter_rows)
            lines += w.other_samples + [f"engine: {e}" for e in w.engine_error_samples]

        lines.append("")
        lines += table_lines(("target (issue 18)", "measured", ""), self._targets(reference, met))
        return lines

    @staticmethod
    def _probe_cell(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{percentile(values, 0.5):.1f} / {percentile(values, 0.99):.1f} (n={len(values)})"

    def _targets(self, reference: float, met: Callable[[bool], str]) -> list[tuple[str, ...]]:
        r = self.results
        rows: list[tuple[str, ...]] = []
        if not reference:
            return [("every target", "no reference figure", "not measured")]
        for result in r.paths:
            target = TARGET_POST_RATIO if result.label.startswith("POST") else TARGET_GET_RATIO
            value = result.rate / reference
            rows.append(
                (f"{result.label} >= {target}x reference", f"{value:.2f}x", met(value >= target))
            )
        batched = [e for e in r.events if e.label.startswith("batched")]
        if batched and not batched[0].error:
            value = batched[0].rate / reference
            rows.append(
                (
                    f"batched events/s >= {TARGET_EVENTS_RATIO}x reference req/s",
                    f"{value:.2f}x",
                    met(value >= TARGET_EVENTS_RATIO),
                )
            )
        else:
            rows.append(
                (f"batched events/s >= {TARGET_EVENTS_RATIO}x reference req/s", "-", "not measured")
            )
        w = r.waiters
        if w is None:
            rows.append(("sync waiters", "-", "not measured"))
            return rows
        answered_ok = w.answers.get("200", 0) + w.answers.get("202", 0)
        rows.append(
            (
                "every waiter answered 200 or 202 (no 503)",
                f"{answered_ok} of {w.waiters}, {w.answers.get('503', 0)} x 503",
                met(answered_ok == w.waiters),
            )
        )
        held = w.connections_parked - w.connections_before
        rows.append(
            (
                f"DB connections held by parked waiters <= {WAITER_CONNECTION_SLACK}",
                f"{held:+d}",
                met(held <= WAITER_CONNECTION_SLACK),
            )
        )
        p99 = percentile(w.probe_wait, 0.99) if w.probe_wait else None
        rows.append(
            (
                f"probe p99 during the wait < {TARGET_PROBE_P99_MS:.0f} ms, every probe 200",
                "-" if p99 is None else f"{p99:.1f} ms, {w.probe_failures} failed",
                met(p99 is not None and p99 < TARGET_PROBE_P99_MS and not w.probe_failures),
            )
        )
        return rows
