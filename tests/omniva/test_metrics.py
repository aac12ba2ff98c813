from __future__ import annotations

import pytest
from django.core.management import call_command

pytestmark = pytest.mark.django_db


def test_v1_metrics_reports_queues_and_api_traffic(api) -> None:
    api.get("/v1/info")
    api.get("/v1/info")

    body = api.get("/v1/metrics").json()

    assert body["status"] == "success"
    data = body["data"]
    assert set(data["queues"]) == {"default", "gpu"}
    assert data["queues"]["default"] == {
        "depth": 0,
        "ready": 0,
        "leased": 0,
        "lag_ms": 0,
        "limit": 10000,
    }
    assert data["api"]["requests_last_minute"] >= 2
    assert data["last_activity"] is not None


def test_queue_depth_and_lag_come_from_the_database(api) -> None:
    from django_q.tasks import async_task

    async_task("math.copysign", 1, -1, cluster="gpu")

    queues = api.get("/v1/metrics").json()["data"]["queues"]

    assert queues["gpu"]["depth"] == 1
    assert queues["default"]["depth"] == 0


def test_prometheus_endpoint_exposes_queue_gauges(client) -> None:
    from django_q.tasks import async_task

    async_task("math.copysign", 1, -1)

    response = client.get("/metrics")

    text = response.content.decode()
    assert response.status_code == 200
    assert 'omniva_queue_depth{queue="default"} 1.0' in text
    assert 'omniva_queue_depth{queue="gpu"} 0.0' in text
    assert "omniva_queue_lag_seconds" in text
    assert "django_http_requests_total_by_method_total" in text


def test_openapi_schema_validates_without_warnings(tmp_path) -> None:
    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml")
    )

    schema = (tmp_path / "schema.yaml").read_text()
    assert "/v1/health" in schema
    assert "ErrorEnvelope" in schema


def test_schema_and_docs_are_served_to_a_key_holder(api) -> None:
    schema = api.get("/v1/schema", HTTP_ACCEPT="application/json")
    docs = api.get("/v1/docs")
    redoc = api.get("/v1/redoc")

    assert schema.status_code == 200
    assert schema.json()["openapi"].startswith("3.")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()
    assert redoc.status_code == 200
    assert b"redoc" in redoc.content.lower()


@pytest.mark.parametrize("path", ["/v1/schema", "/v1/docs", "/v1/redoc"])
def test_schema_and_docs_refuse_without_a_key_in_the_envelope(client, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "UNAUTHENTICATED"


def test_docs_pages_load_their_assets_locally(api) -> None:
    page = api.get("/v1/docs").content.decode()

    assert "cdn.jsdelivr" not in page
    assert "/static/drf_spectacular_sidecar/" in page
