"""Every /v1 request leaves one audit record: who, what, how it ended, what it touched."""

from __future__ import annotations

import logging

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from omniva import services
from omniva.models import AuditRecord, Scope
from tests.conftest import cut_connection

pytestmark = pytest.mark.django_db


def test_a_request_writes_one_audit_record(client, make_key) -> None:
    handle = make_key(Scope.CONTENT, name="automation")

    response = client.post(
        "/v1/projects",
        data={"name": "alpha"},
        content_type="application/json",
        HTTP_X_REQUEST_ID="audit-1",
        **handle.headers,
    )

    record = AuditRecord.objects.get(request_id="audit-1")
    assert response.status_code == 201
    assert record.api_key == handle.key
    assert record.key_name == "automation"
    assert record.method == "POST"
    assert record.path == "/v1/projects"
    assert record.status == 201
    assert record.duration_ms > 0
    assert record.entity_ids == [response.json()["data"]["id"]]


def test_failed_and_anonymous_requests_are_audited_too(client) -> None:
    client.get("/v1/projects", HTTP_X_REQUEST_ID="audit-401")
    client.get("/v1/no-such-thing", HTTP_X_REQUEST_ID="audit-404")

    assert AuditRecord.objects.get(request_id="audit-401").status == 401
    assert AuditRecord.objects.get(request_id="audit-404").status == 404
    assert AuditRecord.objects.get(request_id="audit-404").api_key is None


def test_oversized_request_is_audited(client, settings) -> None:
    settings.OMNIVA_MAX_BODY_BYTES = 2048

    client.post(
        "/v1/projects",
        data="x" * 4096,
        content_type="application/json",
        HTTP_X_REQUEST_ID="audit-413",
    )

    assert AuditRecord.objects.get(request_id="audit-413").status == 413


def test_entity_in_the_path_is_recorded(client, make_key) -> None:
    project = services.project_create(name="beta")
    handle = make_key(Scope.CONTENT)

    client.get(f"/v1/projects/{project.pk}", HTTP_X_REQUEST_ID="audit-get", **handle.headers)

    assert AuditRecord.objects.get(request_id="audit-get").entity_ids == [str(project.pk)]


def test_session_user_is_recorded(client) -> None:
    staff = get_user_model().objects.create_user("ops", password="pw-123456789", is_staff=True)
    client.force_login(staff)

    client.get("/v1/projects", HTTP_X_REQUEST_ID="audit-session")

    record = AuditRecord.objects.get(request_id="audit-session")
    assert record.user == staff
    assert record.api_key is None


def test_paths_outside_v1_are_not_audited(client) -> None:
    client.get("/health")
    client.get("/metrics")

    assert not AuditRecord.objects.exists()


def test_audit_endpoint_finds_records_by_request_id(api) -> None:
    api.get("/v1/info", HTTP_X_REQUEST_ID="find-me")
    api.get("/v1/info", HTTP_X_REQUEST_ID="not-me")

    response = api.get("/v1/audit", {"request_id": "find-me"})

    rows = response.json()["data"]
    assert [row["request_id"] for row in rows] == ["find-me"]
    assert rows[0]["path"] == "/v1/info"


def test_audit_record_never_holds_the_key_secret(client, make_key) -> None:
    handle = make_key(Scope.CONTENT)

    client.get("/v1/projects", HTTP_X_REQUEST_ID="no-secret", **handle.headers)

    record = AuditRecord.objects.get(request_id="no-secret")
    assert handle.secret not in " ".join(str(v) for v in record.__dict__.values())


@pytest.mark.django_db(transaction=True)
def test_an_audit_row_lost_to_a_database_outage_is_one_log_line_without_a_traceback(
    test_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cut_connection(test_database_url)

    with caplog.at_level(logging.WARNING, logger="omniva"):
        services.audit_record_write(
            request_id="lost-1", at=timezone.now(), method="GET", path="/v1/x", status=200,
            duration_ms=1.0,
        )  # fmt: skip
    connection.close()

    [record] = [r for r in caplog.records if "lost-1" in r.getMessage()]
    assert "database unavailable" in record.getMessage()
    assert record.exc_info is None
    assert not AuditRecord.objects.filter(request_id="lost-1").exists()
