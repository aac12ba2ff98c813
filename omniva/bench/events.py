"""The `events` suite of `manage.py bench`: the leased event queue through the HTTP API.

A real server (daphne serving `omniva.asgi:application`, as `manage.py serve` starts
it) runs against the suite's database, with the environment the queue suite gives its
clusters. N client threads of this process play engines, each on one keep-alive
connection (http.client), with an API key of scope `engines`:

- **events/s**: M events of the event type `bench` are queued in one transaction
  (engines.services.event_create); then every client loops `POST /v1/events/claim`
  (batch 10, its own registered engine) and `PUT /v1/events/{id}/status` completed
  with the lease token for each event claimed, until a claim comes back empty. The
  rate is M over the time from the clients' start to the last one's end; every event
  must then be `completed`.
- **health req/s**: the same N threads send `GET /v1/health` on the same server, as
  many requests as the events phase needs at least (M reports, M/10 claims), split
  evenly between them.

The two phases alternate which goes first from round to round, so that machine noise
and whatever one leaves behind (autovacuum) hit both alike. The target is events/s at
least half the health req/s. Any answer outside 2xx fails the suite. The server runs
with a rate limit high enough never to refuse the benchmark itself (the default, per
key, is lower than what N clients send); the per-request rate-limit UPSERT still runs.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines import services as engine_services
from engines.models import EngineInstance, Event, EventStatus, EventType
from omniva import services as core_services
from omniva.bench.harness import HOST, BenchError, suite_env, table_lines
from omniva.models import ApiKey, AuditRecord, Scope
from omniva.processes import ManagedProcess, daphne_argv, free_port

BENCH_NAME = "bench"  # the event type and the engine type
BATCH_SIZE = 10
TARGET_RATIO = 0.5
READY_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 60.0
WARMUP_REQUESTS = 20  # per client, of each kind, before the first round
ERROR_SAMPLES = 5
# Never refuse the benchmark's own requests (the check itself still runs).
SERVER_RATE_ENV = {"OMNIVA_RATE_LIMIT": "1000000000", "OMNIVA_RATE_BURST": "1000000000"}


# --- the server ---------------------------------------------------------------------------


class Server(ManagedProcess):
    """daphne serving the platform, as `manage.py serve` starts it, on its own port."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.port = free_port()
        argv = daphne_argv(port=self.port, options=["--access-log", os.devnull])
        env = suite_env(database_url, **SERVER_RATE_ENV)
        super().__init__(argv, env=env, log_path=log_path, name="the server")

    def wait_ready(self) -> None:
        """Until GET /v1/health answers 200."""
        self.wait_answering(self.port, "/v1/health", status=200, timeout_s=READY_TIMEOUT_S)


# --- the clients ----------------------------------------------------------------------------


@dataclass
class Tally:
    """Answers outside 2xx and failed requests, from every thread."""

    count: int = 0
    samples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str) -> None:
        with self.lock:
            self.count += 1
            if len(self.samples) < ERROR_SAMPLES:
                self.samples.append(what)

    def reset(self) -> None:
        with self.lock:
            self.count = 0
            self.samples = []


class ApiClient:
    """A keep-alive HTTP connection to the server with an API key (the bench suites')."""

    def __init__(self, port: int, secret: str, errors: Tally) -> None:
        self.port = port
        self.headers = {
            "Authorization": f"Bearer {secret}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        self.errors = errors
        self.connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)

    def connect(self) -> None:
        if self.connection.sock is None:
            self.connection.connect()

    def close(self) -> None:
        self.connection.close()

    def call(self, method: str, path: str, body: object = None) -> Any:
        """The envelope's `data`; None (and counted) for an answer outside 2xx."""
        payload = json.dumps(body).encode() if body is not None else None
        try:
            self.connection.request(method, path, body=payload, headers=self.headers)
            response = self.connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.connection.close()  # the next request reconnects
            self.errors.add(f"{method} {path}: {exc.__class__.__name__}: {exc}")
            return None
        if not 200 <= response.status < 300:
            self.errors.add(f"{method} {path}: {response.status} {raw[:300]!r}")
            return None
        try:
            return json.loads(raw)["data"]
        except (ValueError, KeyError, TypeError):
            self.errors.add(f"{method} {path}: {response.status}, not an envelope: {raw[:300]!r}")
            return None


class Client(ApiClient):
    """One engine: an ApiClient that registers, claims and completes."""

    def __init__(self, port: int, secret: str, errors: Tally) -> None:
        super().__init__(port, secret, errors)
        self.engine_id: str | None = None

    def register(self, name: str) -> None:
        engine = self.call(
            "POST", "/v1/engine-instances", {"engine_type": BENCH_NAME, "name": name}
        )
        if engine is None:
            raise BenchError(f"registering engine {name} failed: {self.errors.samples[-1:]}")
        self.engine_id = engine["id"]

    def claim(self) -> list[dict[str, Any]] | None:
        body: dict[str, Any] = {"engine_type": BENCH_NAME, "batch_size": BATCH_SIZE}
        if self.engine_id:
            body["engine_id"] = self.engine_id
        return self.call("POST", "/v1/events/claim", body)

    def complete(self, event: dict[str, Any]) -> bool:
        body = {"status": "completed", "lease_token": event["lease_token"], "result": {}}
        return self.call("PUT", f"/v1/events/{event['id']}/status", body) is not None

    def health(self) -> bool:
        return self.call("GET", "/v1/health") is not None


@dataclass
class Phase:
    """What the threads of one phase did."""

    elapsed_s: float = 0.0
    requests: int = 0
    completed: int = 0


Work = Callable[[Client, threading.Event], tuple[int, int]]


def run_threads(clients: list[Client], work: Work, timeout_s: float) -> Phase:
    """Run `work` on every client at once (threads released together); timed from the
    release to the last thread's end. `work` returns (requests, events completed)."""
    barrier = threading.Barrier(len(clients) + 1)
    stop = threading.Event()
    totals: list[tuple[int, int]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def thread_main(client: Client) -> None:
        try:
            client.connect()
            barrier.wait()
            result = work(client, stop)
        except BaseException as exc:  # reported by the main thread
            with lock:
                failures.append(exc)
            barrier.abort()
            return
        with lock:
            totals.append(result)

    threads = [
        threading.Thread(target=thread_main, args=(client,), daemon=True) for client in clients
    ]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a failure, reported below
        barrier.wait()
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - started
    if any(thread.is_alive() for thread in threads):
        stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S)
        raise BenchError(f"the clients were not done after {timeout_s:.0f} s")
    if failures:
        raise BenchError(f"a client thread failed: {failures[0]!r}") from failures[0]
    return Phase(
        elapsed_s=elapsed,
        requests=sum(requests for requests, _ in totals),
        completed=sum(done for _, done in totals),
    )


def drain_events(client: Client, stop: threading.Event) -> tuple[int, int]:
    """Claim and complete until a claim comes back empty (or fails)."""
    requests = completed = 0
    while not stop.is_set():
        events = client.claim()
        requests += 1
        if not events:
            break
        for event in events:
            requests += 1
            completed += client.complete(event)
    return requests, completed


def health_requests(count: int) -> Work:
    def work(client: Client, stop: threading.Event) -> tuple[int, int]:
        sent = 0
        while sent < count and not stop.is_set():
            client.health()
            sent += 1
        return sent, 0

    return work


# --- the measurements -------------------------------------------------------------------------


@dataclass
class Results:
    event_rates: list[float] = field(default_factory=list)
    event_request_rates: list[float] = field(default_factory=list)
    health_rates: list[float] = field(default_factory=list)
    preload_rates: list[float] = field(default_factory=list)
    requests_per_event: list[float] = field(default_factory=list)
    audit_rows: int = 0
    load_before: float = 0.0
    load_after: float = 0.0


@dataclass
class EventsBench:
    database_url: str
    work_dir: Path
    events: int = 2000
    clients: int = 4
    rounds: int = 3
    say: Callable[[str], None] = print
    results: Results = field(default_factory=Results)
    errors: Tally = field(default_factory=Tally)

    def __post_init__(self) -> None:
        self.server: Server | None = None
        self.key: Any = None
        self.secret = ""
        self.event_type: Any = None
        self.created_type = False
        self.client_list: list[Client] = []

    # --- setup and teardown ---------------------------------------------------------------

    def setup(self) -> None:
        self.key, self.secret = core_services.api_key_create(
            name=f"bench-events-{time.time_ns()}", scopes=[Scope.ENGINES]
        )
        self.event_type = EventType.objects.filter(name=BENCH_NAME).first()
        if self.event_type is None:
            self.event_type = engine_services.event_type_create(
                name=BENCH_NAME, engine_type=BENCH_NAME
            )
            self.created_type = True
        elif self.event_type.engine_type != BENCH_NAME:
            raise BenchError(
                f"an event type {BENCH_NAME!r} exists for engine type "
                f"{self.event_type.engine_type!r}"
            )
        self.purge()
        self.server = Server(self.database_url, self.work_dir / "daphne.log")
        self.server.start()
        self.server.wait_ready()
        run_id = uuid.uuid4().hex[:8]
        self.client_list = [
            Client(self.server.port, self.secret, self.errors) for _ in range(self.clients)
        ]
        for number, client in enumerate(self.client_list):
            client.register(f"bench-{run_id}-{number}")
        self.warm_up()

    def warm_up(self) -> None:
        """The server's first requests import and connect: not part of any round."""

        def work(client: Client, stop: threading.Event) -> tuple[int, int]:
            for _ in range(WARMUP_REQUESTS):
                client.health()
                client.claim()  # the queue is empty
            return 2 * WARMUP_REQUESTS, 0

        run_threads(self.client_list, work, timeout_s=max(60.0, WARMUP_REQUESTS * 2))
        self.check_errors("warming up")

    def purge(self) -> None:
        """Delete every event of the bench type: each round starts on an empty queue."""
        if self.event_type is not None:
            Event.objects.filter(event_type=self.event_type).delete()

    def teardown(self) -> None:
        for client in self.client_list:
            client.close()
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.purge()
        engine_ids = [c.engine_id for c in self.client_list if c.engine_id]
        EngineInstance.objects.filter(pk__in=engine_ids).delete()
        if self.event_type is not None and self.created_type:
            self.event_type.delete()
        self.event_type = None
        if self.key is not None:
            audit = AuditRecord.objects.filter(api_key=self.key)
            self.results.audit_rows = audit.count()
            audit.delete()
            ApiKey.objects.filter(pk=self.key.pk).delete()
            self.key = None

    def check_errors(self, during: str) -> None:
        if self.errors.count:
            raise BenchError(
                f"{self.errors.count} requests failed or answered outside 2xx ({during}); "
                "first: " + " | ".join(self.errors.samples)
            )

    @staticmethod
    def vacuum(*tables: str) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            for table in tables:
                cursor.execute(f"VACUUM ANALYZE {table}")

    # --- one round --------------------------------------------------------------------------

    def health_count(self) -> int:
        """Requests per client: at least what the events phase sends (M + M/batch)."""
        total = self.events + math.ceil(self.events / BATCH_SIZE)
        return math.ceil(total / self.clients)

    def events_phase(self) -> None:
        from django.db import transaction

        self.purge()
        started = time.perf_counter()
        with transaction.atomic():
            for number in range(self.events):
                engine_services.event_create(event_type=self.event_type, data={"n": number})
        preload_s = time.perf_counter() - started
        self.vacuum("engines_event")
        assert self.server is not None
        phase = run_threads(self.client_list, drain_events, timeout_s=max(120.0, self.events / 5))
        self.server.check_alive()
        self.check_errors("claiming and completing events")
        done = Event.objects.filter(
            event_type=self.event_type, status=EventStatus.COMPLETED
        ).count()
        if done != self.events or phase.completed != self.events:
            raise BenchError(
                f"{done} of {self.events} events completed ({phase.completed} reported "
                "completed by the clients)"
            )
        rate = self.events / phase.elapsed_s
        self.results.event_rates.append(rate)
        self.results.event_request_rates.append(phase.requests / phase.elapsed_s)
        self.results.requests_per_event.append(phase.requests / self.events)
        self.results.preload_rates.append(self.events / preload_s)
        self.purge()
        self.say(
            f"  events: {self.events} claimed and completed in {phase.elapsed_s:.2f} s = "
            f"{rate:.0f}/s ({phase.requests} requests, {phase.requests / phase.elapsed_s:.0f}/s)"
        )

    def health_phase(self) -> None:
        assert self.server is not None
        count = self.health_count()
        phase = run_threads(
            self.client_list, health_requests(count), timeout_s=max(120.0, self.events / 5)
        )
        self.server.check_alive()
        self.check_errors("GET /v1/health")
        rate = phase.requests / phase.elapsed_s
        self.results.health_rates.append(rate)
        self.say(
            f"  health: {phase.requests} GET /v1/health in {phase.elapsed_s:.2f} s = {rate:.0f}/s"
        )

    # --- the whole suite ----------------------------------------------------------------------

    def run(self) -> Results:
        self.results.load_before = os.getloadavg()[0]
        try:
            self.setup()
            for round_number in range(1, self.rounds + 1):
                self.say(f"round {round_number}/{self.rounds}")
                phases = [self.events_phase, self.health_phase]
                if round_number % 2 == 0:
                    phases.reverse()
                for phase in phases:
                    phase()
        finally:
            self.teardown()
        self.results.load_after = os.getloadavg()[0]
        return self.results

    # --- the table ----------------------------------------------------------------------------

    def report(self) -> list[str]:
        r = self.results
        med = statistics.median
        events, health = med(r.event_rates), med(r.health_rates)
        ratio = events / health

        def met(ok: bool) -> str:
            return "yes" if ok else "NO"

        rows = [
            (
                f"events claimed+completed/s, batch {BATCH_SIZE}",
                f"{events:.0f}",
                f">= {TARGET_RATIO * health:.0f} ({TARGET_RATIO}x health)",
                met(ratio >= TARGET_RATIO),
            ),
            ("GET /v1/health req/s", f"{health:.0f}", "", ""),
            ("events/s / health req/s", f"{ratio:.2f}x", f">= {TARGET_RATIO}x", ""),
            (
                "event API requests/s (claims + reports)",
                f"{med(r.event_request_rates):.0f}",
                "",
                "",
            ),
        ]
        header = ("figure", "value", "target", "met")

        def listed(values: list[float]) -> str:
            return ", ".join(f"{v:.0f}" for v in values)

        return [
            "",
            f"bench events, {time.strftime('%Y-%m-%d %H:%M')}: {self.clients} clients, "
            f"{self.events} events x {self.rounds} rounds (medians), batch {BATCH_SIZE}, "
            "one daphne, rate limit lifted",
            f"{os.cpu_count()} cores, load average {r.load_before:.2f} before, "
            f"{r.load_after:.2f} after",
            *table_lines(header, rows),
            f"rounds: events/s {listed(r.event_rates)}; health req/s {listed(r.health_rates)}; "
            "ratio "
            + ", ".join(
                f"{e / h:.2f}x" for e, h in zip(r.event_rates, r.health_rates, strict=True)
            ),
            f"requests per event {med(r.requests_per_event):.3f}; preload (event_create in "
            f"one transaction) {med(r.preload_rates):.0f} events/s; "
            f"audit rows of the bench key {r.audit_rows}",
        ]
