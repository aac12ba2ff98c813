"""The health report of /v1/health: named checks, each `ok`, `degraded` or `failed`.

Apps add their checks at start-up with `register_check` (engines and the GPU do, in
the issues that build them). A failed *critical* check makes the service `unhealthy`
(HTTP 503); any other check that is not ok makes it `degraded`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
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
    # Kept with the report for OMNIVA_HEALTH_CACHE_MS; False: run for every report (a
    # check that reads no database, such as the web process's own pool).
    cached: bool = True


_CHECKS: dict[str, HealthCheck] = {}

# The last report's checks, and until when they stand (monotonic seconds). The checks
# read several aggregates; a load balancer or a dashboard polling many times a second
# gets the same answer from one run a second per process.
_kept: tuple[float, dict[str, Any]] | None = None


def register_check(
    name: str, run: Callable[[], CheckResult], *, critical: bool = False, cached: bool = True
) -> None:
    _CHECKS[name] = HealthCheck(name, run, critical, cached)


def check_database() -> CheckResult:
    return {"status": "ok", "latency_ms": selectors.database_ping()}


def check_workers() -> CheckResult:
    clusters = selectors.worker_clusters()
    if not clusters:
        return {"status": "degraded", "clusters": [], "detail": "no worker cluster is running"}
    return {"status": "ok", "clusters": clusters}


# Above this share of PostgreSQL's NOTIFY queue, some session listens and does not
# read: degraded long before the queue is full and notifying commits fail.
NOTIFICATION_QUEUE_DEGRADED_AT = 0.1


def check_notifications() -> CheckResult:
    usage = selectors.notification_queue_usage()
    if usage >= NOTIFICATION_QUEUE_DEGRADED_AT:
        return {
            "status": "degraded",
            "queue_usage": usage,
            "detail": "PostgreSQL's NOTIFY queue is filling: a session listens and does not read",
        }
    return {"status": "ok", "queue_usage": usage}


register_check("database", check_database, critical=True)
register_check("workers", check_workers)
register_check("notifications", check_notifications)


def health_report() -> dict[str, Any]:
    """The report; its database checks are at most OMNIVA_HEALTH_CACHE_MS old."""
    global _kept
    now = time.monotonic()
    ttl_s = settings.OMNIVA_HEALTH_CACHE_MS / 1000
    if ttl_s > 0 and _kept is not None and _kept[0] > now:
        checks = dict(_kept[1])
    else:
        checks = _run_checks(cached=True)
        _kept = (now + ttl_s, checks) if ttl_s > 0 else None
        checks = dict(checks)
    database_down = checks.get("database", {}).get("status") == "failed"
    checks.update(_run_checks(cached=False, database_down=database_down))
    overall = "healthy"
    for name, result in checks.items():
        critical = name in _CHECKS and _CHECKS[name].critical
        if result["status"] == "failed" and critical:
            overall = "unhealthy"
        elif result["status"] != "ok" and overall == "healthy":
            overall = "degraded"
    return _report(overall, checks)


def _run_checks(*, cached: bool, database_down: bool = False) -> dict[str, CheckResult]:
    checks: dict[str, CheckResult] = {}
    for check in _CHECKS.values():
        if check.cached != cached:
            continue
        if database_down and check.cached and check.name != "database":
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
    return checks


def _report(overall: str, checks: dict[str, CheckResult]) -> dict[str, Any]:
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
