"""The health report of /v1/health: named checks, each `ok`, `degraded` or `failed`.

Apps add their checks at start-up with `register_check` (engines and the GPU do, in
the issues that build them). A failed *critical* check makes the service `unhealthy`
(HTTP 503); any other check that is not ok makes it `degraded`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import connection

import omniva
from omniva import selectors

logger = logging.getLogger("omniva.health")

CheckResult = dict[str, Any]


@dataclass(frozen=True)
class HealthCheck:
    name: str
    run: Callable[[], CheckResult]
    critical: bool = False


_CHECKS: dict[str, HealthCheck] = {}


def register_check(name: str, run: Callable[[], CheckResult], *, critical: bool = False) -> None:
    _CHECKS[name] = HealthCheck(name, run, critical)


def check_database() -> CheckResult:
    return {"status": "ok", "latency_ms": selectors.database_ping()}


def check_workers() -> CheckResult:
    clusters = selectors.worker_clusters()
    if not clusters:
        return {"status": "degraded", "clusters": [], "detail": "no worker cluster is running"}
    return {"status": "ok", "clusters": clusters}


register_check("database", check_database, critical=True)
register_check("workers", check_workers)


def health_report() -> dict[str, Any]:
    checks: dict[str, CheckResult] = {}
    overall = "healthy"
    database_down = False
    for check in _CHECKS.values():
        if database_down and check.name != "database":
            checks[check.name] = {"status": "unknown", "detail": "the database is unreachable"}
            continue
        try:
            result = check.run()
        except Exception as exc:
            logger.warning("health check %s failed: %s", check.name, exc)
            # The connection is broken; drop it so the next request reconnects.
            connection.close_if_unusable_or_obsolete()
            result = {"status": "failed", "detail": exc.__class__.__name__}
            database_down = database_down or check.name == "database"
        checks[check.name] = result
        if result["status"] == "failed" and check.critical:
            overall = "unhealthy"
        elif result["status"] != "ok" and overall == "healthy":
            overall = "degraded"
    return {
        "status": overall,
        # Not service_info(): /v1/info's contributions read the database.
        "version": omniva.__version__,
        "uptime_s": selectors.uptime_s(),
        "checks": checks,
        "metrics": {
            name: {"depth": q["depth"], "lag_ms": q["lag_ms"]}
            for name, q in checks.get("queues", {}).get("queues", {}).items()
        },
    }
