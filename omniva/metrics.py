"""Prometheus metrics of Omniva beside django-prometheus's: a registry each app adds its
collectors to from its AppConfig.ready (jobs/metrics.py, engines/metrics.py), and the
core's own (the web process's request pool, PostgreSQL's NOTIFY queue).

Everything here is read from the database at scrape time: jobs are submitted by daphne
and finished by qcluster workers in other processes (and on other machines), and the
database is the one place that saw all of it, so any node's /metrics tells the truth
about the whole deployment and agrees with /v1/metrics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

from prometheus_client.core import REGISTRY, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from omniva import audit, selectors
from omniva.handler import pool_stats

logger = logging.getLogger("omniva.metrics")

_registered: set[str] = set()


def register_collector(collector: Collector) -> None:
    """Add `collector` to the Prometheus registry, once per process (by its class name), so
    a second ready() (tests that set Django up again) does not register a duplicate."""
    name = type(collector).__qualname__
    if name not in _registered:
        REGISTRY.register(collector)
        _registered.add(name)


def histogram_family(
    name: str, documentation: str, labels: list[str], rows: list, bounds: Sequence[float]
) -> HistogramMetricFamily:
    """A histogram of `rows` ({labels, buckets, count, sum}, buckets counted per bound)."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for row in rows:
        buckets = [(str(bound), count) for bound, count in zip(bounds, row["buckets"], strict=True)]
        buckets.append(("+Inf", row["count"]))
        family.add_metric(list(row["labels"]), buckets, row["sum"])
    return family


class WebCollector(Collector):
    """The request pool of the web process that answers the scrape (omniva/handler.py)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = pool_stats()
        if stats is None:
            return
        pid = [str(os.getpid())]
        for name, documentation, value in (
            ("omniva_web_threads", "Request threads of this web process", stats.threads),
            ("omniva_web_busy", "Request threads running a request", stats.busy),
            ("omniva_web_queued", "Requests waiting for a request thread", stats.queued),
            (
                "omniva_web_parked",
                "Requests waiting without a thread (sync, long poll)",
                stats.parked,
            ),
            ("omniva_web_saturation", "(busy + queued) / threads", stats.saturation),
            ("omniva_web_audit_pending", "Audit records not yet written", audit.pending()),
        ):
            family = GaugeMetricFamily(name, documentation, labels=["pid"])
            family.add_metric(pid, value)
            yield family

    def describe(self) -> list:
        return []


class NotificationQueueCollector(Collector):
    """PostgreSQL's NOTIFY queue, shared by the whole deployment (omniva/health.py)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            usage = selectors.notification_queue_usage()
        except Exception as exc:  # the database is down: report nothing rather than fail
            logger.warning("notification queue metric unavailable: %s", exc.__class__.__name__)
            return
        yield GaugeMetricFamily(
            "omniva_notification_queue_usage",
            "Fraction of PostgreSQL's NOTIFY queue in use (full: notifying commits fail)",
            value=usage,
        )

    def describe(self) -> list:
        return []


def register_core_collectors() -> None:
    register_collector(WebCollector())
    register_collector(NotificationQueueCollector())
