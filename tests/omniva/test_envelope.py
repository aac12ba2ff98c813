"""Every /v1 response is the envelope, on success and on each class of error."""

from __future__ import annotations

import json

import pytest

from omniva.models import Project

pytestmark = pytest.mark.django_db


def assert_error_envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["status"] == "error"
    assert body["data"] is None
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["meta"]["request_id"] == response["X-Request-ID"]
    assert body["meta"]["generated_at"].endswith("Z")
    return body


def test_success_is_wrapped_in_the_envelope(client) -> None:
    response = client.get("/v1/info")

    body = response.json()
    assert response.status_code == 200
    assert set(body) == {"status", "data", "error", "meta"}
    assert body["status"] == "success"
    assert body["error"] is None
    assert body["data"]["name"] == "omniva"
    assert body["meta"]["request_id"] == response["X-Request-ID"]


def test_malformed_json_is_malformed_request(api) -> None:
    response = api.post("/v1/projects", data="{not json", content_type="application/json")

    assert_error_envelope(response, 400, "MALFORMED_REQUEST")
    assert not Project.objects.exists()


def test_field_errors_are_validation_error_keyed_by_field(api) -> None:
    response = api.post("/v1/projects", data={"description": 5}, content_type="application/json")

    body = assert_error_envelope(response, 400, "VALIDATION_ERROR")
    assert "name" in body["error"]["details"]
    assert not Project.objects.exists()


def test_unknown_path_under_v1_is_not_found(api) -> None:
    for path in ("/v1/nothing-here", "/v1/projects/extra/segments", "/v1"):
        assert_error_envelope(api.get(path), 404, "NOT_FOUND")
    assert_error_envelope(api.post("/v1/nothing-here"), 404, "NOT_FOUND")


def test_missing_entity_has_its_own_not_found_code(api) -> None:
    response = api.get("/v1/projects/4b0d7a52-60a0-4df7-9d77-3a8a3f0a0e11")

    assert_error_envelope(response, 404, "PROJECT_NOT_FOUND")


def test_wrong_method_is_method_not_allowed(api) -> None:
    response = api.put("/v1/health", data="{}", content_type="application/json")

    assert_error_envelope(response, 405, "METHOD_NOT_ALLOWED")


def test_unsupported_content_type_is_415(api) -> None:
    response = api.post(
        "/v1/projects", data="name=x", content_type="application/x-www-form-urlencoded"
    )

    assert_error_envelope(response, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert not Project.objects.exists()


def test_unauthenticated_is_401_in_the_envelope(client) -> None:
    response = client.get("/v1/projects")

    assert_error_envelope(response, 401, "UNAUTHENTICATED")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.urls("tests.omniva.urls_failing")
def test_unexpected_exception_is_internal_error_without_traceback(api) -> None:
    response = api.get("/v1/test-failure")

    body = assert_error_envelope(response, 500, "INTERNAL_ERROR")
    assert "Traceback" not in response.content.decode()
    assert "boom-secret-detail" not in json.dumps(body)


@pytest.mark.urls("tests.omniva.urls_failing")
def test_database_errors_are_503_with_retry_after(api) -> None:
    response = api.get("/v1/test-database-down")

    assert_error_envelope(response, 503, "SERVICE_UNAVAILABLE")
    assert response["Retry-After"] == "5"


def test_browsable_api_shows_the_envelope(api) -> None:
    response = api.get("/v1/info", HTTP_ACCEPT="text/html")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    assert "&quot;status&quot;: &quot;success&quot;" in page
    assert "&quot;request_id&quot;" in page


def test_paths_outside_v1_keep_django_pages(client) -> None:
    response = client.get("/no-such-page")

    assert response.status_code == 404
    assert not response["Content-Type"].startswith("application/json")


def test_a_disallowed_host_under_v1_is_an_enveloped_400(client) -> None:
    response = client.get("/v1/info", HTTP_HOST="evil.example")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MALFORMED_REQUEST"


def test_not_acceptable_is_answered_in_json_envelope(api) -> None:
    response = api.get("/v1/info", HTTP_ACCEPT="text/csv")

    assert response.status_code == 406
    assert response.json()["error"]["code"] == "NOT_ACCEPTABLE"
