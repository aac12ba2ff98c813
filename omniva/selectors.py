"""Reads of the core: key lookup, queue statistics, service info and metrics."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Callable, Hashable
from datetime import timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.db import connection
from django.db.models import Count, Max, Q
from django.utils import timezone

import omniva
from omniva.models import KEY_PREFIX, Activity, ApiKey, AuditRecord, Clip, Project, api_key_hash
from omniva.null_character import NULL

STARTED_AT = timezone.now()


# Keys found in the last OMNIVA_KEY_CACHE_S seconds, by the hash of their secret: a
# request with a known key costs no query. A revocation reaches this process at once
# (api_key_revoke forgets the cache) and every other process within the cache's time.
_keys_seen: dict[str, tuple[float, ApiKey]] = {}
KEYS_SEEN_MAX = 10_000


def api_key_for_secret(raw: str) -> ApiKey | None:
    """The key whose secret is `raw` (revoked or not), or None."""
    parts = raw.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) > 16 or NULL in raw:
        return None  # (U+0000: no key has it, and PostgreSQL could not even look it up)
    digest = api_key_hash(raw)
    now = time.monotonic()
    seen = _keys_seen.get(digest)
    if seen is not None and seen[0] > now:
        return seen[1]
    key = ApiKey.objects.select_related("project").filter(prefix=parts[1]).first()
    if key is None or not hmac.compare_digest(key.key_hash, digest):
        return None
    if settings.OMNIVA_KEY_CACHE_S > 0:
        if len(_keys_seen) >= KEYS_SEEN_MAX:
            _keys_seen.clear()
        _keys_seen[digest] = (now + settings.OMNIVA_KEY_CACHE_S, key)
    return key


def api_keys_forget() -> None:
    """Look every key up again on its next use (after a revocation here)."""
    _keys_seen.clear()


def uptime_s() -> float:
    return round((timezone.now() - STARTED_AT).total_seconds(), 3)


def worker_clusters() -> list[dict[str, Any]]:
    """The django-q2 clusters that reported in the last few seconds."""
    from django_q.status import Stat

    return [
        {
            "cluster_id": str(stat.cluster_id),
            "host": stat.host,
            "status": stat.status,
            "workers": len(getattr(stat, "workers", []) or []),
            "uptime_s": round(stat.uptime(), 1) if hasattr(stat, "uptime") else None,
        }
        for stat in Stat.get_all()
    ]


# Apps add their parts of /v1/info and /v1/metrics at start-up (the core imports no
# app): each contributor gets the dict being built and fills in its keys.
InfoContributor = Callable[[dict[str, Any]], None]
INFO_CONTRIBUTORS: list[InfoContributor] = []
METRICS_CONTRIBUTORS: list[InfoContributor] = []


def contribute_info(contributor: InfoContributor) -> None:
    if contributor not in INFO_CONTRIBUTORS:
        INFO_CONTRIBUTORS.append(contributor)


def contribute_metrics(contributor: InfoContributor) -> None:
    if contributor not in METRICS_CONTRIBUTORS:
        METRICS_CONTRIBUTORS.append(contributor)


def database_kind() -> str:
    return "external" if settings.DATABASE_URL else "embedded"


def service_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": "omniva",
        "version": omniva.__version__,
        "config": {
            "queues": settings.OMNIVA_QUEUES,
            "workers": {"default": settings.OMNIVA_WORKERS, "gpu": settings.OMNIVA_GPU_WORKERS},
            "max_retries": settings.OMNIVA_MAX_RETRIES,
            "backoff_s": settings.OMNIVA_RETRY_BACKOFF_S,
            "event_lease_s": settings.OMNIVA_EVENT_LEASE_S,
            "engine_offline_after_s": settings.OMNIVA_ENGINE_OFFLINE_AFTER_S,
            "device": settings.OMNIVA_DEVICE,
            "pipelines": [],
            "persistence": {"database": database_kind(), "engine": "postgresql"},
            "limits": {
                "rate_limit_per_s": settings.OMNIVA_RATE_LIMIT,
                "rate_burst": settings.OMNIVA_RATE_BURST,
                "queue_limit": settings.OMNIVA_QUEUE_LIMIT,
                "max_body_bytes": settings.OMNIVA_MAX_BODY_BYTES,
                "page_max": 500,
            },
        },
    }
    for contributor in INFO_CONTRIBUTORS:
        contributor(info)
    return info


def service_metrics() -> dict[str, Any]:
    now = timezone.now()
    minute_ago = now - timedelta(minutes=1)
    api = AuditRecord.objects.filter(at__gte=minute_ago).aggregate(
        requests=Count("id"), errors=Count("id", filter=Q(status__gte=500))
    )
    last = AuditRecord.objects.aggregate(at=Max("at"))["at"]
    # The newest outbox row (the primary key's end): the last change of any job, stage,
    # engine or event.
    changed = Activity.objects.order_by("-id").values_list("at", flat=True).first()
    if changed is not None and (last is None or changed > last):
        last = changed
    metrics: dict[str, Any] = {
        "workers": {"clusters": len(worker_clusters())},
        "api": {
            "requests_last_minute": api["requests"],
            "server_errors_last_minute": api["errors"],
        },
        "last_activity": last.isoformat().replace("+00:00", "Z") if last else None,
        "uptime_s": uptime_s(),
    }
    for contributor in METRICS_CONTRIBUTORS:
        contributor(metrics)
    return metrics


# --- Counts that stay cheap however long a table grows --------------------------------------

# The live feed reads /v1/metrics's figures every 5 s in every web process, and /metrics
# and the health checks read theirs on every scrape: a count stops at this many rows, and
# past it the planner's estimate (pg_class.reltuples and the column statistics, kept by
# autovacuum's ANALYZE) stands in. Each condition is one an index answers.
EXACT_COUNT_LIMIT = 10_000

K = TypeVar("K", bound=Hashable)


def counts_bounded(table: str, conditions: dict[K, tuple[str, list[Any]]]) -> dict[K, int]:
    """For each key, how many rows of `table` match its condition (the caller's own SQL,
    values as %s parameters): exact up to EXACT_COUNT_LIMIT, the planner's estimate
    above it. One statement, plus one EXPLAIN per count over the limit."""
    if not conditions:
        return {}
    capped = (
        f"(SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {where}"  # noqa: S608 (the callers' SQL)
        f" LIMIT {EXACT_COUNT_LIMIT + 1}) capped)"
        for where, _ in conditions.values()
    )
    params = [param for _, values in conditions.values() for param in values]
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + ", ".join(capped), params)
        counts = dict(zip(conditions, cursor.fetchone(), strict=True))
        for key, count in counts.items():
            if count > EXACT_COUNT_LIMIT:
                where, values = conditions[key]
                explain = f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} WHERE {where}"  # noqa: S608
                cursor.execute(explain, values)
                plan = cursor.fetchone()[0]
                plan = json.loads(plan) if isinstance(plan, str) else plan
                counts[key] = max(count, round(plan[0]["Plan"]["Plan Rows"]))
    return counts


def notification_queue_usage() -> float:
    """The fraction of PostgreSQL's one NOTIFY queue in use (0 to 1): near 0 while every
    listening session reads; it grows behind one that listens and does not read, and
    when it is full every commit that notifies fails."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notification_queue_usage()")
        return float(cursor.fetchone()[0])


def database_ping() -> float:
    """Round-trip time of `SELECT 1` in ms; raises when the database is unreachable."""
    import time

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return round((time.perf_counter() - started) * 1000, 2)


def clips_nearest(
    *, project: Project | None, vector: list[float], limit: int, exclude: Any = None
) -> list[tuple[Clip, float]]:
    """The embedded clips closest to `vector` by cosine distance (the HNSW index), with
    their cosine similarity, best first."""
    from pgvector.django import CosineDistance

    clips = Clip.objects.filter(embedding__isnull=False)
    if project is not None:
        clips = clips.filter(project=project)
    if exclude is not None:
        clips = clips.exclude(pk=exclude)
    ranked = clips.annotate(distance=CosineDistance("embedding", vector)).order_by("distance")
    return [(clip, 1.0 - clip.distance) for clip in ranked[:limit]]
