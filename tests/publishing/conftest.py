"""Publishing runs its stages through the in-process worker of the job-engine tests;
a fake platform behind a signed webhook."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from omniva.models import Project
from publishing.models import Destination
from tests.jobs.conftest import drain, due, stop_job_listener

__all__ = ["drain", "due", "stop_job_listener"]

SECRET = "whsec-test-123"


class FakeWebhook(http.server.ThreadingHTTPServer):
    """A platform that keeps one item per Idempotency-Key and checks signatures.
    `fail_next` answers 500 that many times; `hang_up_next` takes the item, then closes
    the connection without an answer (the worker never learns it was published);
    `hold_next` takes the item, sets `received` and answers nothing until `release`."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.hold_next = 0
        self.received = threading.Event()
        self.release = threading.Event()
        self.requests = 0
        self.bad_signatures = 0
        self.fail_next = 0
        self.hang_up_next = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeWebhook

    def do_POST(self) -> None:
        server = self.server
        server.requests += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if self.headers.get("X-Omniva-Signature") != expected:
            server.bad_signatures += 1
            self._answer(401, {"error": "bad signature"})
            return
        if server.fail_next:
            server.fail_next -= 1
            self._answer(500, {"error": "down"})
            return
        key = self.headers["Idempotency-Key"]
        item = server.items.setdefault(
            key, {"id": f"ext-{len(server.items) + 1}", **json.loads(body)}
        )
        if server.hold_next:
            server.hold_next -= 1
            server.received.set()
            server.release.wait(timeout=120)
            self.close_connection = True
            return
        if server.hang_up_next:
            server.hang_up_next -= 1
            self.close_connection = True
            self.connection.close()
            return
        self._answer(200, {"id": item["id"], "url": f"https://platform.test/{item['id']}"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[FakeWebhook]:
    server = FakeWebhook()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def hook_for(project: Project, webhook: FakeWebhook) -> Destination:
    return Destination.objects.create(
        project=project,
        name="hook",
        kind="webhook",
        config={"url": webhook.url},
        secrets={"secret": SECRET},
    )
