from __future__ import annotations

import pytest

from omniva.models import Project

pytestmark = pytest.mark.django_db


def test_body_over_the_limit_is_413_and_writes_nothing(api, settings) -> None:
    settings.OMNIVA_MAX_BODY_BYTES = 4096
    payload = '{"name": "big", "description": "' + "x" * 8192 + '"}'

    response = api.post("/v1/projects", data=payload, content_type="application/json")

    assert response.status_code == 413
    body = response.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert not Project.objects.exists()


def test_body_under_the_limit_is_accepted(api, settings) -> None:
    settings.OMNIVA_MAX_BODY_BYTES = 4096

    response = api.post("/v1/projects", data={"name": "small"}, content_type="application/json")

    assert response.status_code == 201


def test_invalid_content_length_is_malformed_request(api) -> None:
    response = api.post(
        "/v1/projects", data="{}", content_type="application/json", CONTENT_LENGTH="-5"
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MALFORMED_REQUEST"
