from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.django_db


def test_incoming_request_id_is_kept_in_header_and_meta(client) -> None:
    response = client.get("/v1/info", HTTP_X_REQUEST_ID="trace-42.a:b")

    assert response["X-Request-ID"] == "trace-42.a:b"
    assert response.json()["meta"]["request_id"] == "trace-42.a:b"


def test_missing_request_id_is_generated(client) -> None:
    first = client.get("/v1/info")["X-Request-ID"]
    second = client.get("/v1/info")["X-Request-ID"]

    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


@pytest.mark.parametrize("bad", ["has space", "x" * 200, "<script>", "-leading-dash", "ünïcode"])
def test_malformed_request_id_is_replaced(client, bad: str) -> None:
    response = client.get("/v1/info", HTTP_X_REQUEST_ID=bad)

    assert response["X-Request-ID"] != bad
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


def test_error_responses_carry_the_request_id(client) -> None:
    response = client.get("/v1/projects", HTTP_X_REQUEST_ID="req-401")

    assert response.status_code == 401
    assert response["X-Request-ID"] == "req-401"
    assert response.json()["meta"]["request_id"] == "req-401"
