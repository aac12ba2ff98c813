"""Server faults under load: clients keep submitting while daphne is killed, or while
the database is stopped and started again.

What is proved, with real processes (daphne, a `qcluster`, the run's PostgreSQL):

- A SIGKILL of daphne loses no accepted job and makes no job twice. Clients whose
  request got no answer resend it with the same `Idempotency-Key` to the daphne started
  in its place: every key names at most one job, every answered job exists and
  completes, once.
- A database restart needs no process restarted. While the server is down, submissions
  are answered `503 SERVICE_UNAVAILABLE` (no hang, no 500, daphne stays up); clients
  resend with the same key; daphne and the worker reconnect by themselves, the broker
  LISTENs again (its log says so and a job is picked up at once, not at the next
  fallback poll), the cluster reports its status again, a websocket client of the live
  stream gets every job's completion once, and every job submitted before, during and
  after completes once.
- The cluster's status report (django-q2's guard, on Django's connection) reconnects
  after its connection was cut, instead of failing until the next schedule run.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import signal
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import DatabaseError, connections
from django.db.models import Count
from django.utils import timezone
from django_q.status import Stat
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from jobs.broker import FALLBACK_POLL_S, PostgresBroker
from jobs.models import ACTIVE_STATUSES, Job, JobStatus, StageRun
from omniva.embedded_db import EmbeddedServer
from omniva.models import Activity, Scope
from omniva.services import api_key_create
from tests.conftest import (
    ProcessGroup,
    Server,
    cut_connection,
    free_port,
    http_get,
    start_daphne,
    start_worker,
    wait_for,
)
from tests.jobs.conftest import (  # noqa: F401 (the autouse fixtures of tests/jobs/)
    fresh_saturation_cache,
    stop_job_listener,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# A request with no answer: refused while no daphne listens, reset by a killed one.
NO_ANSWER = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
# Answers that ask the client to come back: the database is down (503), a rate limit (429).
RESEND_STATUSES = {429, 503}
# The client's own pause before resending (its backoff, not a wait of the test).
RESEND_PAUSE_S = 0.1
REQUEST_TIMEOUT_S = 30.0
# A key that has no final answer after this long fails the test (a hang, not a fault).
KEY_DEADLINE_S = 120.0
CLIENT_THREADS = 8


@dataclass
class Submission:
    """One idempotency key, sent until it got a final answer."""

    key: str
    sends: int = 0
    unanswered: int = 0  # sends that got no answer at all
    resend_answers: list[tuple[int, str]] = field(default_factory=list)  # (status, code)
    status: int | None = None
    envelope: Any = None
    answered_at: float = 0.0

    @property
    def job_id(self) -> str | None:
        data = self.envelope.get("data") if isinstance(self.envelope, dict) else None
        return data.get("id") if isinstance(data, dict) else None


def post_job(url: str, secret: str, key: str, body: dict[str, Any], timeout: float) -> Any:
    """(status, parsed body or the raw bytes when it is not JSON); raises NO_ANSWER."""
    request = urllib.request.Request(
        f"{url}/v1/jobs",
        method="POST",
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {secret}",
            "Content-Type": "application/json",
            "Idempotency-Key": key,
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def submit_until_answered(
    url: str,
    secret: str,
    key: str,
    body: dict[str, Any],
    *,
    timeout: float = REQUEST_TIMEOUT_S,
    on_answer: Callable[[int], None] | None = None,
) -> Submission:
    """Send the same request (same key) until it gets an answer other than 'retry';
    `on_answer(status)` hears every answer as it comes."""
    submission = Submission(key)
    deadline = time.monotonic() + KEY_DEADLINE_S
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"{key}: no final answer in {KEY_DEADLINE_S} s: {submission}")
        submission.sends += 1
        try:
            status, envelope = post_job(url, secret, key, body, timeout)
        except NO_ANSWER:
            submission.unanswered += 1
            time.sleep(RESEND_PAUSE_S)
            continue
        if on_answer is not None:
            on_answer(status)
        if status in RESEND_STATUSES:
            code = envelope.get("error", {}).get("code", "") if isinstance(envelope, dict) else ""
            submission.resend_answers.append((status, code))
            time.sleep(RESEND_PAUSE_S)
            continue
        submission.status, submission.envelope = status, envelope
        submission.answered_at = time.monotonic()
        return submission


class Clients:
    """Threads that each submit one key after another until stopped; each key is sent
    until answered, so a stop never leaves a key half done."""

    def __init__(self, url: str, body: dict[str, Any], threads: int = CLIENT_THREADS) -> None:
        self.url = url
        self.body = body
        self.stopping = threading.Event()
        self.done: list[Submission] = []
        self.answers: Counter[int] = Counter()  # every answer by status, as it comes
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        # One API key per thread: each has its own rate-limit bucket.
        self.secrets = [
            api_key_create(name=f"client-{n}", scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE])[1]
            for n in range(threads)
        ]
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"client-{n}", daemon=True)
            for n in range(threads)
        ]

    def start(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, n: int) -> None:
        try:
            for i in itertools.count():
                if self.stopping.is_set():
                    return
                submission = submit_until_answered(
                    self.url, self.secrets[n], f"client-{n}-{i}", self.body, on_answer=self._heard
                )
                with self._lock:
                    self.done.append(submission)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def _heard(self, status: int) -> None:
        with self._lock:
            self.answers[status] += 1

    def heard(self, status: int) -> int:
        with self._lock:
            return self.answers[status]

    def answered_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for s in self.done if s.answered_at > moment)

    def stop(self) -> list[Submission]:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=KEY_DEADLINE_S + REQUEST_TIMEOUT_S)
        assert not self.errors, self.errors
        assert not any(thread.is_alive() for thread in self._threads)
        return list(self.done)


def logs(folder: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        for log in sorted(folder.glob("*.log"))
    )


def wait_all_finished(job_ids: set[str], folder: Path) -> None:
    wait_for(
        lambda: not Job.objects.filter(pk__in=job_ids, status__in=ACTIVE_STATUSES).exists(),
        timeout=120,
        interval=0.2,
        what=f"every job to finish\n{logs(folder)}",
    )


@dataclass
class Outcome:
    """What the database holds for the clients' keys, counted."""

    jobs: int
    keys_with_two_jobs: int
    answered_without_job: int  # an answered job id that the database does not hold
    not_completed: int
    completions: Counter[str]  # job id -> completed job:update rows
    second_attempts: int

    @property
    def duplicated_effects(self) -> int:
        extra_completions = sum(n - 1 for n in self.completions.values() if n > 1)
        return self.keys_with_two_jobs + extra_completions

    @property
    def jobs_lost(self) -> int:
        return self.answered_without_job + self.not_completed


def count_outcome(submissions: list[Submission]) -> Outcome:
    keys = {s.key for s in submissions}
    per_key = Counter(
        Job.objects.filter(idempotency_key__in=keys).values_list("idempotency_key", flat=True)
    )
    jobs = dict(Job.objects.filter(idempotency_key__in=keys).values_list("pk", "status"))
    answered = {s.job_id for s in submissions}
    completions = Counter(
        {
            str(row["job_id"]): row["n"]
            for row in Activity.objects.filter(
                kind="job:update", data__status=JobStatus.COMPLETED, job_id__in=jobs
            )
            .values("job_id")
            .annotate(n=Count("id"))
        }
    )
    return Outcome(
        jobs=len(jobs),
        keys_with_two_jobs=sum(1 for n in per_key.values() if n > 1),
        answered_without_job=len(answered - {str(pk) for pk in jobs}),
        not_completed=sum(
            1
            for pk, status in jobs.items()
            if status != JobStatus.COMPLETED or completions[str(pk)] == 0
        ),
        completions=completions,
        second_attempts=StageRun.objects.filter(job_id__in=jobs, attempt__gt=1).count(),
    )


def check_answers(submissions: list[Submission]) -> None:
    """Every key got 202 (made by that request) or 200 (made by an earlier send of it)."""
    statuses = Counter(s.status for s in submissions)
    assert set(statuses) <= {200, 202}, (statuses, [s for s in submissions if s.status > 202])
    assert all(s.job_id for s in submissions)
    assert len({s.job_id for s in submissions}) == len(submissions), "one job per key"
    # A 200 means an earlier send of the same key made the job: only a send that got no
    # answer (or a retry answer) can have done so.
    assert all(s.unanswered or s.resend_answers for s in submissions if s.status == 200)


def test_a_daphne_killed_while_clients_submit_loses_no_job_and_makes_none_twice(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path, fault_report: Callable
) -> None:
    port = free_port()
    server = start_daphne(processes, test_database_url, port, tmp_path / "daphne-1.log")
    clients = Clients(server.url, {"pipeline": "noop"}).start()
    # A request surely in flight at the kill: a sync submission waits for its job, and
    # no worker runs until daphne was killed.
    sync_secret = clients.secrets[0]
    sync_result: list[Submission] = []
    sync_client = threading.Thread(
        target=lambda: sync_result.append(
            submit_until_answered(
                server.url,
                sync_secret,
                "sync-in-flight",
                {"pipeline": "noop", "sync": True, "sync_timeout_s": 120},
                timeout=150,
            )
        ),
        daemon=True,
    )
    sync_client.start()
    wait_for(
        lambda: (
            Job.objects.filter(idempotency_key="sync-in-flight").exists()
            and Job.objects.count() >= 4 * CLIENT_THREADS
        ),
        timeout=60,
        what=f"jobs submitted before the kill\n{logs(tmp_path)}",
    )

    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=10)
    jobs_at_kill = Job.objects.count()
    restarted = start_daphne(processes, test_database_url, port, tmp_path / "daphne-2.log")
    restarted_at = time.monotonic()
    start_worker(processes, test_database_url, tmp_path / "qcluster.log")
    wait_for(
        lambda: clients.answered_since(restarted_at) >= 2 * CLIENT_THREADS,
        timeout=60,
        what=f"answers from the new daphne\n{logs(tmp_path)}",
    )
    submissions = clients.stop()
    sync_client.join(timeout=KEY_DEADLINE_S + 150)
    assert sync_result, f"the sync client got no answer\n{logs(tmp_path)}"
    submissions += sync_result
    assert restarted.process.poll() is None, logs(tmp_path)

    wait_all_finished({s.job_id for s in submissions}, tmp_path)
    outcome = count_outcome(submissions)
    unanswered = [s for s in submissions if s.unanswered]
    fault_report(
        submitted=len(submissions),
        accepted_202=sum(1 for s in submissions if s.status == 202),
        answered_200_made_earlier=sum(1 for s in submissions if s.status == 200),
        unanswered_then_resent=len(unanswered),
        jobs_at_kill=jobs_at_kill,
        jobs=outcome.jobs,
        completed=len(outcome.completions),
        jobs_lost=outcome.jobs_lost,
        duplicated_effects=outcome.duplicated_effects,
    )
    check_answers(submissions)
    sync = sync_result[0]
    assert sync.unanswered >= 1, "the kill cut the sync request"
    assert sync.status == 200
    assert sync.envelope["data"]["status"] == JobStatus.COMPLETED
    assert outcome.jobs == len(submissions), "one job per key answered, none besides"
    assert outcome.jobs_lost == 0
    assert outcome.duplicated_effects == 0
    assert outcome.second_attempts == 0
    assert len(outcome.completions) == len(submissions)


class LiveWatcher:
    """A websocket client of /ws/events that keeps every row message it receives; when
    its connection closes it comes back with its cursor (`after`), as clients do."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = f"ws{url.removeprefix('http')}/ws/events?token={secret}"
        self.rows: list[dict[str, Any]] = []
        self.reconnects = 0
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="live-watcher", daemon=True)

    def start(self) -> LiveWatcher:
        self._thread.start()
        wait_for(lambda: self.ready.is_set() or self.errors, what="the live snapshot")
        assert not self.errors, self.errors
        return self

    def _run(self) -> None:
        after: int | None = None
        deadline = time.monotonic() + KEY_DEADLINE_S
        while not self.stopping.is_set():
            url = self.url if after is None else f"{self.url}&after={after}"
            try:
                with ws_connect(url, open_timeout=10) as ws:
                    while not self.stopping.is_set():
                        with contextlib.suppress(TimeoutError):
                            message = json.loads(ws.recv(timeout=0.5))
                            if message["type"] == "snapshot":
                                self.ready.set()
                            elif message["type"] != "metrics":
                                self.rows.append(message)
                                after = message.get("cursor", message["id"])
                            deadline = time.monotonic() + KEY_DEADLINE_S
            except (ConnectionClosed, OSError, TimeoutError, InvalidStatus):
                self.reconnects += 1
                if time.monotonic() > deadline:
                    self.errors.append(AssertionError("the live stream stayed away"))
                    return
                time.sleep(RESEND_PAUSE_S)
            except BaseException as exc:  # reported by stop()
                self.errors.append(exc)
                return

    def completed_jobs(self) -> Counter[str]:
        return Counter(
            m["job_id"]
            for m in list(self.rows)
            if m["type"] == "job:update" and m["data"]["status"] == JobStatus.COMPLETED
        )

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(timeout=30)
        assert not self.errors, self.errors


def stop_database(server: EmbeddedServer) -> None:
    connections.close_all()  # this process's own connection: reopened on next use
    assert server.stop(mode="fast"), "the server was running"


def restart_database(server: EmbeddedServer) -> None:
    if not server.is_running():
        server.start(owner_pid=os.getpid())


def pickup_s(server: Server, secret: str, key: str) -> float:
    """Submit a job and wait for it: how long it was queued before a worker started it."""
    answer = submit_until_answered(server.url, secret, key, {"pipeline": "noop"})
    assert answer.status == 202, answer
    job = wait_for(
        lambda: Job.objects.filter(pk=answer.job_id, status=JobStatus.COMPLETED).first(),
        timeout=30,
        what=f"probe {key} to complete",
    )
    queued: timedelta = job.started_at - job.created_at
    return queued.total_seconds()


PICKUP_PROBES = 7
# django-q2's guard reports every half second; without a reconnect it would report
# again only when its scheduler next closes old connections (every 30 s).
WORKERS_REPORT_AGAIN_S = 8


def test_a_database_restart_under_load_is_ridden_out_by_the_server_and_the_workers(
    processes: ProcessGroup,
    test_database_url: str,
    embedded_test_server: EmbeddedServer,
    tmp_path: Path,
    fault_report: Callable,
) -> None:
    server = start_daphne(processes, test_database_url, free_port(), tmp_path / "daphne.log")
    # A short lease: a task whose stage failed on the lost connection is delivered again
    # after one lease (it is not acknowledged), so the test need not wait a minute.
    worker = start_worker(
        processes, test_database_url, tmp_path / "qcluster.log", OMNIVA_TASK_LEASE_S="3"
    )
    watcher = LiveWatcher(
        server.url, api_key_create(name="watcher", scopes=[Scope.JOBS_READ])[1]
    ).start()
    clients = Clients(server.url, {"pipeline": "noop"}, threads=4).start()
    wait_for(
        lambda: Job.objects.filter(status=JobStatus.COMPLETED).count() >= 10,
        timeout=60,
        what=f"jobs completed before the restart\n{logs(tmp_path)}",
    )

    try:
        stop_database(embedded_test_server)
        stopped_at = time.monotonic()
        heard_503 = clients.heard(503)
        # Submissions go on: each must be answered 503 (not hang, not 500) while down.
        wait_for(
            lambda: clients.heard(503) >= heard_503 + 4 or clients.errors,
            timeout=30,
            what=f"503 answers while the database is down\n{logs(tmp_path)}",
        )
        assert not clients.errors, clients.errors
        assert server.process.poll() is None, logs(tmp_path)
        assert worker.poll() is None, logs(tmp_path)
        answered_while_down = clients.answered_since(stopped_at)
    finally:
        restart_database(embedded_test_server)
    restarted_at, restarted_wall = time.monotonic(), timezone.now()
    # The worker cluster reports its status again within a few guard cycles (the
    # `workers` health check reads these reports).
    wait_for(
        lambda: any(stat.timestamp > restarted_wall for stat in Stat.get_all()),
        timeout=WORKERS_REPORT_AGAIN_S,
        what=f"the cluster to report again\n{logs(tmp_path)}",
    )
    workers_report_again_s = time.monotonic() - restarted_at

    wait_for(
        lambda: clients.answered_since(restarted_at) >= 20 or clients.errors,
        timeout=60,
        what=f"answers after the restart\n{logs(tmp_path)}",
    )
    submissions = clients.stop()
    job_ids = {s.job_id for s in submissions}
    wait_all_finished(job_ids, tmp_path)
    # The live stream carried every completion across the restart, once.
    with contextlib.suppress(AssertionError):  # what is missing is counted below as lost
        wait_for(lambda: job_ids <= set(watcher.completed_jobs()), timeout=30)
    watcher.stop()
    seen = watcher.completed_jobs()
    row_ids = Counter(m["id"] for m in watcher.rows)
    # Picked up at once: the broker LISTENs again, on its new connection, when it waits.
    # Probes sent one after another each meet a fresh fallback wait, so a broker that did
    # not LISTEN again would start them near FALLBACK_POLL_S late (seen: median 926 ms).
    probe_secret = clients.secrets[0]
    pickups = [pickup_s(server, probe_secret, f"probe-{n}") for n in range(PICKUP_PROBES)]
    assert server.process.poll() is None, logs(tmp_path)
    assert worker.poll() is None, logs(tmp_path)
    checks = http_get(f"{server.url}/v1/health").json()["data"]["checks"]
    assert checks["database"]["status"] == "ok", checks
    assert checks["workers"]["status"] == "ok", checks

    outcome = count_outcome(submissions)
    refusals = Counter(answer for s in submissions for answer in s.resend_answers)
    worker_log = (tmp_path / "qcluster.log").read_text(errors="replace")
    daphne_log = (tmp_path / "daphne.log").read_text(errors="replace")
    fault_report(
        submitted=len(submissions),
        accepted_202=sum(1 for s in submissions if s.status == 202),
        answered_200_made_earlier=sum(1 for s in submissions if s.status == 200),
        answered_503_then_resent=sum(1 for s in submissions if s.resend_answers),
        answers_503=sum(n for (status, _), n in refusals.items() if status == 503),
        unanswered_then_resent=sum(1 for s in submissions if s.unanswered),
        answered_while_down=answered_while_down,
        jobs=outcome.jobs,
        completed=len(outcome.completions),
        stages_run_again=outcome.second_attempts,
        pickup_ms_median=round(statistics.median(pickups) * 1000),
        workers_report_again_ms=round(workers_report_again_s * 1000),
        live_rows=len(watcher.rows),
        live_reconnects=watcher.reconnects,
        jobs_lost=outcome.jobs_lost,
        duplicated_effects=outcome.duplicated_effects,
        events_lost=len(job_ids - set(seen)),
        events_duplicated=sum(n - 1 for n in row_ids.values()),
    )
    check_answers(submissions)
    assert set(refusals) <= {(503, "SERVICE_UNAVAILABLE"), (429, "RATE_LIMITED")}, refusals
    assert refusals[(503, "SERVICE_UNAVAILABLE")] >= 4
    assert outcome.jobs == len(submissions)
    assert outcome.jobs_lost == 0
    assert outcome.duplicated_effects == 0
    assert job_ids <= set(seen), "events lost: the live stream missed completions"
    assert max(row_ids.values()) == 1, "events duplicated: a row came twice"
    assert "Internal Server Error" not in daphne_log, daphne_log[-3000:]
    assert "unhandled error" not in daphne_log, daphne_log[-3000:]
    # The live feed and the broker lost their connections and came back, listening again.
    assert "activity feed lost its connection" in daphne_log, daphne_log[-3000:]
    assert "broker connection lost" in worker_log, worker_log[-3000:]
    assert "broker connection restored" in worker_log, worker_log[-3000:]
    assert statistics.median(pickups) < FALLBACK_POLL_S / 4, pickups


def test_the_clusters_status_report_reconnects_after_its_connection_was_cut(
    test_database_url: str,
) -> None:
    broker = PostgresBroker()
    broker.set_stat("test-stat", "before", 3)
    cut_connection(test_database_url)

    with pytest.raises(DatabaseError):
        broker.set_stat("test-stat", "cut", 3)  # the report that meets the cut connection
    broker.set_stat("test-stat", "after", 3)  # the next guard cycle
    assert broker.get_stat("test-stat") == "after"
