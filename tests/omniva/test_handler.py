"""The web processes' HTTP handler (omniva/handler.py) run in this process: a persistent
connection is pinged before a request only when it has been idle."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.db import connection, connections

from jobs import services as job_services
from omniva.connection_health import HEALTH_CHECK_AFTER_IDLE_S
from omniva.handler import PooledHTTPHandler
from omniva.models import Scope
from omniva.services import api_key_create

pytestmark = pytest.mark.django_db(transaction=True)


def _get(handler: PooledHTTPHandler, path: str, key: str) -> int:
    scope: dict[str, Any] = {
        "type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
        "headers": [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {key}".encode())],
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
    }  # fmt: skip
    response, closed = handler._respond(scope, io.BytesIO(b""))
    if not closed:
        handler._finish(response)
    return response.status_code


def test_a_connection_that_just_served_a_request_is_not_pinged_and_an_idle_one_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As in a web process: persistent connections, checked before reuse.
    monkeypatch.setitem(connection.settings_dict, "CONN_MAX_AGE", 600)
    monkeypatch.setitem(connection.settings_dict, "CONN_HEALTH_CHECKS", True)
    key = api_key_create(name="pinged", scopes=[Scope.JOBS_READ])[1]
    job, _ = job_services.job_submit(pipeline="noop")
    pings: list[bool] = []
    wrapper_class = type(connections["default"])
    is_usable = wrapper_class.is_usable

    def counted(wrapper: Any) -> bool:
        pings.append(True)
        return is_usable(wrapper)

    monkeypatch.setattr(wrapper_class, "is_usable", counted)
    handler = PooledHTTPHandler(threads=1)
    path = f"/v1/jobs/{job.pk}"

    assert _get(handler, path, key) == 200  # its connection, made or checked now
    pings.clear()
    assert _get(handler, path, key) == 200
    assert pings == []  # busy: no round trip of its own

    connection.omniva_work_finished_at -= HEALTH_CHECK_AFTER_IDLE_S + 1  # type: ignore[attr-defined]
    assert _get(handler, path, key) == 200
    assert pings == [True]  # idle for longer: checked before its first query
