"""The live stream end to end: a websocket client of a real daphne sees the transitions
a real `qcluster` worker commits, and resumes with its cursor after a disconnect."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.sync.client import ClientConnection, connect

from omniva.models import Scope
from omniva.processes import daphne_argv, http_status, qcluster_argv
from omniva.services import api_key_create
from tests.conftest import ProcessGroup, free_port, wait_for
from tests.jobs.conftest import (  # noqa: F401 (the autouse fixtures of tests/jobs/)
    fresh_saturation_cache,
    stop_job_listener,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RECV_TIMEOUT_S = 15
# A one-stage job's rows: submitted (HTTP), then started and completed by the worker.
LIFECYCLE = [
    ("job:update", "pending"),
    ("stage:update", "queued"),
    ("job:update", "running"),
    ("stage:update", "running"),
    ("stage:update", "completed"),
    ("job:update", "completed"),
]


@dataclass
class Platform:
    url: str
    secret: str
    daphne: subprocess.Popen
    worker: subprocess.Popen
    logs: Path

    def output(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
            for log in sorted(self.logs.glob("*.log"))
        )

    def check_alive(self) -> None:
        assert self.daphne.poll() is None, self.output()
        assert self.worker.poll() is None, self.output()

    def ws(self, path: str) -> ClientConnection:
        return connect(f"ws{self.url.removeprefix('http')}{path}", open_timeout=10)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["data"]

    def submit(self, pipeline: str, params: dict[str, Any] | None = None) -> str:
        return self.request("POST", "/v1/jobs", {"pipeline": pipeline, "params": params or {}})[
            "id"
        ]

    def worker_pids(self) -> set[int]:
        leader = psutil.Process(self.worker.pid)
        return {leader.pid, *(child.pid for child in leader.children(recursive=True))}


@pytest.fixture
def platform(processes: ProcessGroup, test_database_url: str, tmp_path: Path) -> Platform:
    port = free_port()
    env = {"DATABASE_URL": test_database_url}
    # Both start at once; daphne is waited for, the worker must stay up meanwhile.
    daphne = processes.spawn(
        daphne_argv(port=port), env=env, log=tmp_path / "daphne.log", name="daphne"
    )
    worker = processes.spawn(
        qcluster_argv(),
        env={**env, "Q_CLUSTER_NAME": "default"},
        log=tmp_path / "qcluster.log",
        name="qcluster",
    )
    assert daphne.popen is not None
    assert worker.popen is not None
    _key, secret = api_key_create(name="live", scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE])
    running = Platform(f"http://127.0.0.1:{port}", secret, daphne.popen, worker.popen, tmp_path)

    def answering() -> bool:
        running.check_alive()
        return http_status(port, "/v1/health") is not None

    daphne.wait_until(answering, what="answer /v1/health", timeout_s=30)
    return running


def receive(ws: ClientConnection, platform: Platform, after: list[dict[str, Any]]) -> Any:
    try:
        return json.loads(ws.recv(timeout=RECV_TIMEOUT_S))
    except TimeoutError:
        raise AssertionError(
            f"no message in {RECV_TIMEOUT_S} s after {after}\n{platform.output()}"
        ) from None


def receive_until(
    ws: ClientConnection, done: Callable[[dict[str, Any]], bool], platform: Platform
) -> list[dict[str, Any]]:
    """The row messages up to the one `done` accepts (periodic `metrics` left out)."""
    received: list[dict[str, Any]] = []
    while True:
        message = receive(ws, platform, received)
        if message["type"] == "metrics":
            continue
        received.append(message)
        if done(message):
            return received


def completed(job_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: (
        m["type"] == "job:update" and m["job_id"] == job_id and m["data"]["status"] == "completed"
    )


def cursor_of(message: dict[str, Any]) -> int:
    """The position to resume from: the message's `cursor`, or its id where the
    protocol makes the id the cursor (rows delivered in id order)."""
    return message.get("cursor", message["id"])


def transitions(messages: list[dict[str, Any]], job_id: str) -> list[tuple[str, str]]:
    """The job's and its stage's changes of status, in the order they came (a row that
    leaves the status as it was, a stage's progress, is no transition)."""
    changes: list[tuple[str, str]] = []
    last: dict[str, str] = {}
    for m in messages:
        if m["job_id"] != job_id or m["type"] not in ("job:update", "stage:update"):
            continue
        status = m["data"]["status"]
        if last.get(m["type"]) != status:
            changes.append((m["type"], status))
            last[m["type"]] = status
    return changes


def summary(messages: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{m['id']} {m['type']} {m['job_id']} {m['data'].get('status')}" for m in messages
    )


def test_a_client_sees_a_workers_transitions_live_and_resumes_with_its_cursor(
    platform: Platform,
) -> None:
    with platform.ws(f"/ws/events?token={platform.secret}") as ws:
        snapshot = receive(ws, platform, [])
        assert snapshot["type"] == "snapshot", snapshot
        assert snapshot.get("data", snapshot)["jobs"] == []
        job_id = platform.submit("sleep", {"seconds": 1})
        live = receive_until(ws, completed(job_id), platform)

    assert transitions(live, job_id) == LIFECYCLE, summary(live)
    ids = [m["id"] for m in live]
    assert ids == sorted(set(ids)), "ids increase, none twice"
    assert ids[0] > snapshot["cursor"]
    assert all(cursor_of(m) <= m["id"] for m in live)
    cursors = [cursor_of(m) for m in live]
    assert cursors == sorted(cursors)
    # The running and completed states were committed by the worker, not by daphne.
    stage_workers = {
        int(m["data"]["worker"].rsplit(":", 1)[1])
        for m in live
        if m["type"] == "stage:update" and m["data"]["status"] in ("running", "completed")
    }
    assert len(stage_workers) == 1
    assert stage_workers <= platform.worker_pids(), stage_workers
    updated_at = {
        m["data"]["status"]: datetime.fromisoformat(m["data"]["updated_at"])
        for m in live
        if m["type"] == "job:update"
    }
    assert updated_at["pending"] < updated_at["running"] < updated_at["completed"]

    # Missed while away: a job submitted and finished with no client connected.
    cursor = cursor_of(live[-1])
    missed_id = platform.submit("noop")

    def missed_completed() -> bool:
        platform.check_alive()
        return platform.request("GET", f"/v1/jobs/{missed_id}")["status"] == "completed"

    wait_for(missed_completed, timeout=20, interval=0.1, what="the missed job to complete")
    with platform.ws(f"/ws/events?token={platform.secret}&after={cursor}") as ws:
        replayed = receive_until(ws, completed(missed_id), platform)

    assert all(m["type"] != "snapshot" for m in replayed)
    assert all(m["id"] > cursor for m in replayed)
    # Rows between the cursor and the last id received may come again; nothing else.
    assert {m["job_id"] for m in replayed} <= {job_id, missed_id}
    assert {m["id"] for m in replayed if m["job_id"] == job_id} <= set(ids)
    assert transitions(replayed, missed_id) == LIFECYCLE, summary(replayed)
    replayed_ids = [m["id"] for m in replayed]
    assert replayed_ids == sorted(set(replayed_ids))
    assert all(cursor_of(m) <= m["id"] for m in replayed)
