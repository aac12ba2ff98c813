"""A websocket client that stops reading costs a real daphne a bounded amount, and is
dropped; a client that reads gets every row meanwhile (omniva/live.py, ConnectionFlow)."""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.db import transaction
from websockets.sync.client import ClientConnection, connect

from omniva.models import Scope
from omniva.services import activity_record, api_key_create
from tests.conftest import ProcessGroup, free_port, try_http_get, wait_for
from tests.jobs.conftest import (  # noqa: F401 (the autouse fixtures of tests/jobs/)
    fresh_saturation_cache,
    stop_job_listener,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Messages a consumer may have waiting before it is closed (OMNIVA_LIVE_CLIENT_BACKLOG).
BACKLOG = 50
ROW_BYTES = 16_000
# Far more than the socket buffers, daphne's 64 KiB mark and the backlog together: the
# stalled client must be dropped well before this much is written.
MOST_ROWS = 3_000
CHECK_EVERY_ROWS = 10


def start_daphne(processes: ProcessGroup, database_url: str, tmp_path: Path) -> tuple[Any, int]:
    port = free_port()
    daphne = processes.start(
        [
            sys.executable, "-m", "daphne",
            "--bind", "127.0.0.1", "--port", str(port),
            # No keepalive pings: only the backpressure may drop the client.
            "--ping-interval", "3600", "--ping-timeout", "3600",
            "omniva.asgi:application",
        ],
        env={"DATABASE_URL": database_url, "OMNIVA_LIVE_CLIENT_BACKLOG": str(BACKLOG)},
        log=tmp_path / "daphne.log",
    )  # fmt: skip

    def answering() -> bool:
        assert daphne.poll() is None, (tmp_path / "daphne.log").read_text()
        return try_http_get(f"http://127.0.0.1:{port}/v1/health", timeout=5) is not None

    wait_for(answering, timeout=30, interval=0.1, what="daphne to answer")
    return daphne, port


def stalled_client(port: int, secret: str) -> socket.socket:
    """A websocket handshake on a raw socket with a small receive buffer, then nothing
    is ever read again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    nonce = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/events?token={secret}&topics=jobs HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {nonce}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # a byte at a time: no frame is taken
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


class Reader(threading.Thread):
    """A client that reads everything, until the row whose data says `last`."""

    def __init__(self, ws: ClientConnection) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.rows = 0
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                message = json.loads(self.ws.recv(timeout=60))
                if message["type"] != "log":
                    continue
                self.rows += 1
                if message["data"].get("last"):
                    self.done.set()
                    return
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.done.set()


def server_holds(daphne: Any, client_port: int) -> bool:
    return any(
        c.raddr and c.raddr.port == client_port and c.status == psutil.CONN_ESTABLISHED
        for c in psutil.Process(daphne.pid).net_connections(kind="tcp")
    )


def write_row(data: dict[str, Any]) -> None:
    with transaction.atomic():
        activity_record(kind="log", data=data)


def test_a_client_that_stops_reading_is_dropped_while_a_reader_gets_every_row(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    daphne, port = start_daphne(processes, test_database_url, tmp_path)
    _key, secret = api_key_create(name="backpressure", scopes=[Scope.JOBS_READ])
    stalled = stalled_client(port, secret)
    with connect(f"ws://127.0.0.1:{port}/ws/events?token={secret}", max_size=None) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"
        reader = Reader(ws)
        reader.start()
        written = stall_until_dropped(daphne, stalled)
        write_row({"message": "end", "last": True})
        written += 1
        assert reader.done.wait(timeout=60), f"reader got {reader.rows} of {written} rows"
        assert reader.error is None, reader.error
        assert reader.rows == written
    stalled.close()


def stall_until_dropped(daphne: Any, stalled: socket.socket) -> int:
    """Rows written, each in its own transaction, until the server let the stalled
    client go (or MOST_ROWS)."""
    stalled_port = stalled.getsockname()[1]
    assert server_holds(daphne, stalled_port)
    rss_before = psutil.Process(daphne.pid).memory_info().rss
    written = 0
    payload = "x" * ROW_BYTES
    while written < MOST_ROWS:
        write_row({"message": payload, "n": written})
        written += 1
        if written % CHECK_EVERY_ROWS == 0 and not server_holds(daphne, stalled_port):
            break
    rss_after = psutil.Process(daphne.pid).memory_info().rss
    print(
        f"stalled client dropped after {written} rows ({written * ROW_BYTES >> 20} MiB"
        f" written); daphne RSS {rss_before >> 20} -> {rss_after >> 20} MiB"
    )
    assert written < MOST_ROWS, "the server kept a client that reads nothing"
    return written
