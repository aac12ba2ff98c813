"""/v1/health and /health: healthy with a worker cluster running, degraded without one."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.test import override_settings

from omniva import health
from tests.conftest import start_worker, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _health(client) -> dict:
    response = client.get("/v1/health")
    assert response.status_code == 200
    return response.json()["data"]


def test_without_workers_the_service_is_degraded(client) -> None:
    # A cluster that an earlier test killed leaves its last report for a few seconds.
    cache.clear()

    report = _health(client)

    assert report["status"] == "degraded"
    assert report["checks"]["database"]["status"] == "ok"
    assert report["checks"]["workers"]["status"] == "degraded"
    assert report["checks"]["queues"]["queues"]["default"]["depth"] == 0
    assert set(report) >= {"status", "version", "uptime_s", "checks", "metrics"}


@pytest.mark.parametrize("path", ["/health", "/v1/health"])
def test_health_probes_over_plain_http_are_not_redirected_to_https(client, path: str) -> None:
    with override_settings(SECURE_SSL_REDIRECT=True):
        probe = client.get(path)
        other = client.get("/v1/pipelines")

    assert probe.status_code == 200
    assert other.status_code == 301
    assert other["Location"].startswith("https://")


@pytest.mark.slow
def test_a_running_worker_cluster_makes_it_healthy(
    client, processes, test_database_url, tmp_path
) -> None:
    start_worker(processes, test_database_url, tmp_path / "qcluster.log")

    report = wait_for(
        lambda: (r := _health(client))["status"] == "healthy" and r,
        timeout=60,
        interval=0.2,
        what="a worker cluster to report in",
    )

    assert report["checks"]["workers"]["clusters"][0]["status"] in {"Idle", "Working", "Starting"}


def test_root_health_is_the_same_report(client) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json()["data"]["checks"]["database"]["status"] == "ok"


def test_the_database_checks_are_run_once_per_interval_and_the_web_check_every_time(
    client, settings, monkeypatch
) -> None:
    settings.OMNIVA_HEALTH_CACHE_MS = 60_000
    monkeypatch.setattr(health, "_kept", None)
    runs = {"database_backed": 0, "live": 0}

    def database_backed() -> dict:
        runs["database_backed"] += 1
        return {"status": "ok"}

    def live() -> dict:
        runs["live"] += 1
        return {"status": "ok", "runs": runs["live"]}

    monkeypatch.setattr(
        health,
        "_CHECKS",
        {
            **health._CHECKS,
            "counted": health.HealthCheck("counted", database_backed),
            "live": health.HealthCheck("live", live, cached=False),
        },
    )
    reports = [client.get("/v1/health").json()["data"] for _ in range(3)]

    assert runs == {"database_backed": 1, "live": 3}
    assert [r["checks"]["live"]["runs"] for r in reports] == [1, 2, 3]
    settings.OMNIVA_HEALTH_CACHE_MS = 0
    client.get("/v1/health")
    assert runs["database_backed"] == 2


def test_the_notify_queue_usage_is_reported_and_degrades_the_service_above_its_mark(
    client, monkeypatch: pytest.MonkeyPatch
) -> None:
    check = _health(client)["checks"]["notifications"]
    assert check["status"] == "ok"
    assert 0 <= check["queue_usage"] < health.NOTIFICATION_QUEUE_DEGRADED_AT

    # A queue filling behind a session that does not read (the mark lowered to 0 here).
    monkeypatch.setattr(health, "NOTIFICATION_QUEUE_DEGRADED_AT", 0.0)
    report = _health(client)
    assert report["status"] == "degraded"
    assert report["checks"]["notifications"]["status"] == "degraded"
    assert "omniva_notification_queue_usage " in client.get("/metrics").content.decode()
