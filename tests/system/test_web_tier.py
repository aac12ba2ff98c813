"""The web tier as real processes: waits that hold nothing, several web processes on one
port, and a web process killed while clients submit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from websockets.sync.client import connect as ws_connect

from jobs.models import Job
from omniva.models import Scope
from omniva.services import api_key_create
from tests.conftest import (
    REPO_ROOT,
    free_port,
    start_daphne,
    start_worker,
    try_http_get,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WEB_THREADS = 4


async def _request(
    port: int, method: str, path: str, *, key: str, body: Any = None, headers: dict | None = None
) -> tuple[int, Any]:
    """One HTTP/1.1 request on a connection of its own (asyncio streams, so that hundreds
    can wait at once in one test thread)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, content = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        content = _unchunk(content)
    return int(head.split(b" ", 2)[1]), json.loads(content)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def _client_backends(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _web_report(url: str) -> dict:
    result = try_http_get(f"{url}/v1/health", timeout=5)
    assert result is not None
    assert result.status == 200
    return result.json()["data"]["checks"]["web"]


def test_two_hundred_sync_waits_hold_no_database_connection_and_finish_with_their_jobs(
    processes, test_database_url, tmp_path, fault_report
) -> None:
    key = api_key_create(name="waiters", scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE])[1]
    port = free_port()
    server = start_daphne(
        processes,
        test_database_url,
        port,
        tmp_path / "daphne.log",
        env={"OMNIVA_WEB_THREADS": str(WEB_THREADS), "OMNIVA_RATE_LIMIT": "100000"},
    )
    waiters = 200
    outcome: dict[str, Any] = {}

    async def wait_all() -> None:
        # Every pool thread has its connection before the baseline is read.
        await asyncio.gather(
            *(_request(port, "GET", "/v1/jobs?limit=1", key=key) for _ in range(WEB_THREADS * 4))
        )
        outcome["before"] = _client_backends(test_database_url)
        submissions = [
            asyncio.ensure_future(
                _request(
                    port,
                    "POST",
                    "/v1/jobs",
                    key=key,
                    body={"pipeline": "noop", "sync": True, "sync_timeout_s": 120},
                )
            )
            for _ in range(waiters)
        ]
        timed_out = asyncio.ensure_future(
            _request(
                port,
                "POST",
                "/v1/jobs",
                key=key,
                body={"pipeline": "noop", "sync": True, "sync_timeout_s": 1},
            )
        )
        outcome["timed_out"] = await timed_out
        await asyncio.to_thread(
            wait_for,
            lambda: _web_report(server.url)["parked"] >= waiters,
            timeout=60,
            what=f"{waiters} parked requests",
        )
        outcome["during"] = _client_backends(test_database_url)
        outcome["probe"] = await _request(port, "GET", "/v1/jobs?limit=5", key=key)
        outcome["report"] = await asyncio.to_thread(_web_report, server.url)
        # Now a worker runs the jobs: each waiter is answered with its finished job.
        start_worker(processes, test_database_url, tmp_path / "worker.log")
        outcome["answers"] = await asyncio.wait_for(asyncio.gather(*submissions), timeout=120)

    asyncio.run(wait_all())

    statuses = Counter(status for status, _ in outcome["answers"])
    job_statuses = Counter(body["data"]["status"] for _, body in outcome["answers"])
    fault_report(
        waiters=waiters,
        connections_before=outcome["before"],
        connections_during=outcome["during"],
        answered_200=statuses[200],
    )
    timed_out_status, timed_out_body = outcome["timed_out"]
    assert timed_out_status == 202
    assert timed_out_body["data"]["status"] == "pending"
    assert outcome["report"]["parked"] >= waiters
    # 200 waits, and a few connections more, whatever the number of waits: the job
    # listener's and those of the threads that answer parked requests (half the pool),
    # opened by the first wait.
    assert outcome["during"] <= outcome["before"] + 1 + WEB_THREADS // 2, outcome
    assert outcome["probe"][0] == 200
    assert statuses == {200: waiters}
    assert job_statuses == {"completed": waiters}


def test_websocket_clients_of_two_web_processes_get_every_change_in_order_and_resume(
    processes, test_database_url, tmp_path
) -> None:
    key = api_key_create(name="watchers", scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE])[1]
    servers = [
        start_daphne(processes, test_database_url, free_port(), tmp_path / f"web{n}.log")
        for n in (1, 2)
    ]
    start_worker(processes, test_database_url, tmp_path / "worker.log")
    jobs = 6
    seen: dict[int, list[dict]] = {0: [], 1: []}
    cursors: dict[int, int] = {}
    ready = threading.Barrier(3)

    def watch(index: int) -> None:
        url = servers[index].url.replace("http", "ws") + f"/ws/events?token={key}"
        with ws_connect(url, open_timeout=10) as socket:
            snapshot = json.loads(socket.recv(timeout=10))
            cursors[index] = snapshot["cursor"]
            ready.wait(timeout=30)
            finished: set[str] = set()
            while len(finished) < jobs:
                message = json.loads(socket.recv(timeout=60))
                if message.get("type") != "job:update":
                    continue
                seen[index].append(message)
                if message["data"]["status"] == "completed":
                    finished.add(message["job_id"])

    watchers = [threading.Thread(target=watch, args=(index,)) for index in (0, 1)]
    for watcher in watchers:
        watcher.start()
    ready.wait(timeout=30)
    for number in range(jobs):
        server = servers[number % 2]
        port = int(server.url.rsplit(":", 1)[1])
        status, _ = asyncio.run(
            _request(port, "POST", "/v1/jobs", key=key, body={"pipeline": "noop"})
        )
        assert status == 202
    for watcher in watchers:
        watcher.join(timeout=90)
        assert not watcher.is_alive()

    # Both processes' clients saw the same rows in the same order.
    first, second = ([(m["id"], m["data"]["status"]) for m in seen[i]] for i in (0, 1))
    assert first == second
    assert [cursor for cursor, _ in first] == sorted(cursor for cursor, _ in first)
    assert {m["job_id"] for m in seen[0] if m["data"]["status"] == "completed"} == {
        str(job.pk) for job in Job.objects.all()
    }
    # A client of the other process resumes from the first one's cursor: nothing lost.
    url = servers[1].url.replace("http", "ws") + f"/ws/events?token={key}&after={cursors[0]}"
    with ws_connect(url, open_timeout=10) as socket:
        replayed: list[tuple[int, str]] = []
        while len(replayed) < len(first):
            message = json.loads(socket.recv(timeout=30))
            if message.get("type") == "job:update":
                replayed.append((message["id"], message["data"]["status"]))
    assert replayed == first


def test_serve_spreads_new_connections_over_its_web_processes_and_refuses_a_taken_port(
    processes, scratch_var, tmp_path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    env = {"OMNIVA_VAR_DIR": str(scratch_var), "OMNIVA_WEB_PROCESSES": "2"}
    serve = processes.manage(
        "serve", "--port", str(port), "--grpc-port", "0", "--queues", "", env=env, log=log
    )
    wait_for(lambda: "Omniva is up" in log.read_text(), timeout=90, what="serve to be up")

    # 32 connections opened at once, as a client's pool (or wrk) opens them, before any
    # request: then each asks which web process accepted it (the `web` check of
    # /v1/health names its pid).
    connections = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(32)]
    pids: Counter[int] = Counter()
    for connection in connections:
        with connection:
            connection.sendall(
                b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
            raw = b"".join(iter(lambda c=connection: c.recv(65536), b""))
            head, _, content = raw.partition(b"\r\n\r\n")
            if b"transfer-encoding: chunked" in head.lower():
                content = _unchunk(content)
            pids[json.loads(content)["data"]["checks"]["web"]["pid"]] += 1
    web = {
        child.pid
        for child in psutil.Process(serve.pid).children()
        if "daphne" in " ".join(child.cmdline())
    }
    assert set(pids) == web
    # The kernel hashes each connection to a process: an even share, give or take.
    assert min(pids.values()) >= 6, pids

    second = processes.manage(
        "serve", "--port", str(port), "--no-migrate", "--queues", "", env=env,
        log=tmp_path / "second.log",
    )  # fmt: skip
    assert second.wait(timeout=60) != 0
    assert "Cannot listen" in (tmp_path / "second.log").read_text()
    assert serve.poll() is None


def test_a_killed_web_process_is_replaced_while_the_others_serve_and_nothing_accepted_is_lost(
    processes, scratch_var, tmp_path, fault_report
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    serve = processes.manage(
        "serve",
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--queues",
        "default",
        env={
            "OMNIVA_VAR_DIR": str(scratch_var),
            "OMNIVA_WORKERS": "1",
            "OMNIVA_WEB_PROCESSES": "2",
            "OMNIVA_RATE_LIMIT": "100000",
        },
        log=log,
    )

    def web_pids() -> list[int]:
        return [
            child.pid
            for child in psutil.Process(serve.pid).children()
            if "daphne" in " ".join(child.cmdline())
        ]

    wait_for(lambda: "Omniva is up" in log.read_text(), timeout=90, what="serve to be up")
    assert len(web_pids()) == 2
    key = _make_key_in(scratch_var, port)

    accepted: dict[str, str] = {}  # idempotency key -> job id
    answers: Counter[int | str] = Counter()

    async def submit(number: int) -> None:
        idempotency = f"kill-{number}-{uuid.uuid4().hex[:6]}"
        for _ in range(20):  # a request cut by the kill is resent with its key
            try:
                status, body = await _request(
                    port,
                    "POST",
                    "/v1/jobs",
                    key=key,
                    body={"pipeline": "noop"},
                    headers={"Idempotency-Key": idempotency},
                )
            except (OSError, ValueError, IndexError) as exc:
                answers[type(exc).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            answers[status] += 1
            if status in (200, 202):
                accepted[idempotency] = body["data"]["id"]
                return
            await asyncio.sleep(0.1)

    async def load() -> list[int]:
        # The kill lands while submissions are in flight on both processes.
        submissions = [asyncio.ensure_future(submit(n)) for n in range(120)]
        deadline = time.monotonic() + 60
        while len(accepted) < 20:
            assert time.monotonic() < deadline, f"only {len(accepted)} accepted: {answers}"
            await asyncio.sleep(0.01)
        victim = web_pids()[0]
        psutil.Process(victim).send_signal(signal.SIGKILL)
        await asyncio.gather(*submissions)
        return [victim]

    victims = asyncio.run(load())
    wait_for(
        lambda: len(web_pids()) == 2 and victims[0] not in web_pids(),
        timeout=60,
        what="serve to start a replacement",
    )
    after = asyncio.run(_request(port, "GET", "/v1/jobs?limit=1", key=key))
    wait_for(
        lambda: _completed_in(scratch_var, port, key, accepted),
        timeout=120,
        what="every accepted job to complete",
    )

    fault_report(
        submitted=120,
        accepted=len(accepted),
        answered={k: v for k, v in answers.items() if isinstance(k, int)}.get(202, 0),
        cut_by_kill=sum(v for k, v in answers.items() if isinstance(k, str)),
    )
    assert "starting it again" in log.read_text()
    assert serve.poll() is None
    assert after[0] == 200
    assert len(accepted) == 120
    assert len(set(accepted.values())) == 120


def _make_key_in(var: Path, port: int) -> str:
    """A key in serve's own database (not the test database)."""
    output = subprocess.run(
        [sys.executable, str(REPO_ROOT / "manage.py"), "apikey", "create", "killer",
         "--scope", "jobs:read", "--scope", "jobs:write"],
        env={**_serve_env(var)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    return output.strip().splitlines()[-1]


def _serve_env(var: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DATABASE_URL"))}
    env.update({"OMNIVA_VAR_DIR": str(var), "DJANGO_SETTINGS_MODULE": "omniva.settings"})
    return env


def _completed_in(var: Path, port: int, key: str, accepted: dict[str, str]) -> bool:
    async def statuses() -> list[str]:
        answers = await asyncio.gather(
            *(_request(port, "GET", f"/v1/jobs/{job_id}", key=key) for job_id in accepted.values())
        )
        return [body["data"]["status"] for _, body in answers]

    return all(status == "completed" for status in asyncio.run(statuses()))


def test_a_web_process_stopped_with_sigterm_writes_every_audit_record_it_batched(
    processes, test_database_url, tmp_path
) -> None:
    key = api_key_create(name="audited", scopes=[Scope.JOBS_READ])[1]
    port = free_port()
    # A long flush interval: the rows are still in the batch when SIGTERM arrives.
    server = start_daphne(
        processes,
        test_database_url,
        port,
        tmp_path / "daphne.log",
        env={"OMNIVA_AUDIT_FLUSH_MS": "10000", "OMNIVA_RATE_LIMIT": "100000"},
    )
    request_ids = [f"sigterm-{uuid.uuid4().hex[:8]}-{n}" for n in range(60)]

    async def requests() -> list[int]:
        answers = await asyncio.gather(
            *(
                _request(port, "GET", "/v1/jobs?limit=1", key=key, headers={"X-Request-ID": rid})
                for rid in request_ids
            )
        )
        return [status for status, _ in answers]

    statuses = asyncio.run(requests())
    with psycopg.connect(test_database_url, autocommit=True) as connection:
        before = _audited(connection, request_ids)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
        after = _audited(connection, request_ids)

    assert statuses == [200] * len(request_ids)
    assert before < len(request_ids)  # they were batched, not written one by one
    assert after == len(request_ids), server.output()


def _audited(connection: psycopg.Connection, request_ids: list[str]) -> int:
    row = connection.execute(
        "SELECT count(*) FROM omniva_auditrecord WHERE request_id = ANY(%s)", (request_ids,)
    ).fetchone()
    assert row is not None
    return int(row[0])
