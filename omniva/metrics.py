"""Prometheus metrics of Omniva beside django-prometheus's.

Everything here is read from the database at scrape time: jobs are submitted by daphne
and finished by qcluster workers in other processes (and on other machines), and the
database is the one place that saw all of it, so any node's /metrics tells the truth
about the whole deployment and agrees with /v1/metrics. The job figures are tallied up
to a cursor (jobs.models.MetricTally, moved by each scrape): a scrape reads the tallies
and the rows since, and the retention pass deleting old jobs lowers no counter.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

logger = logging.getLogger("omniva.metrics")


class QueueCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from jobs import selectors

        try:
            stats = selectors.queue_stats()
        except Exception as exc:  # the database is down: report nothing rather than fail
            logger.warning("queue metrics unavailable: %s", exc.__class__.__name__)
            return
        depth = GaugeMetricFamily(
            "omniva_queue_depth", "Tasks waiting or running per queue", labels=["queue"]
        )
        lag = GaugeMetricFamily(
            "omniva_queue_lag_seconds", "Age of the oldest ready task per queue", labels=["queue"]
        )
        for queue, row in stats.items():
            depth.add_metric([queue], row["depth"])
            lag.add_metric([queue], row["lag_ms"] / 1000)
        yield depth
        yield lag

    def describe(self) -> list:
        # No describe-time collection: registering must not touch the database.
        return []


def _histogram(name: str, documentation: str, labels: list[str], rows: list) -> Iterator:
    from jobs.selectors import DURATION_BUCKETS

    family = HistogramMetricFamily(name, documentation, labels=labels)
    for row in rows:
        buckets = [
            (str(bound), count)
            for bound, count in zip(DURATION_BUCKETS, row["buckets"], strict=True)
        ]
        buckets.append(("+Inf", row["count"]))
        family.add_metric(list(row["labels"]), buckets, row["sum"])
    yield family


class JobCollector(Collector):
    def collect(self) -> Iterator:
        from jobs import selectors, services

        try:
            services.metric_tallies_advance()
            figures = selectors.metric_figures()
            totals = selectors.job_totals_by_pipeline(figures)
            histograms = selectors.duration_histograms(figures)
        except Exception as exc:
            logger.warning("job metrics unavailable: %s", exc.__class__.__name__)
            return
        submitted = CounterMetricFamily(
            "omniva_jobs_submitted", "Jobs submitted", labels=["pipeline"]
        )
        for pipeline, count in sorted(totals["submitted"].items()):
            submitted.add_metric([pipeline], count)
        yield submitted
        finished = CounterMetricFamily(
            "omniva_jobs_finished", "Jobs finished, by final status", labels=["pipeline", "status"]
        )
        for (pipeline, status), count in sorted(totals["finished"].items()):
            finished.add_metric([pipeline, status], count)
        yield finished
        yield from _histogram(
            "omniva_job_duration_seconds",
            "Run time of completed jobs",
            ["pipeline"],
            histograms["jobs"],
        )
        yield from _histogram(
            "omniva_stage_duration_seconds",
            "Run time of completed stage attempts",
            ["pipeline", "stage", "queue"],
            histograms["stages"],
        )

    def describe(self) -> list:
        return []


class EngineCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from engines import selectors

        try:
            events = selectors.event_counts()
            engines = selectors.engine_counts()
        except Exception as exc:
            logger.warning("engine metrics unavailable: %s", exc.__class__.__name__)
            return
        event_family = GaugeMetricFamily(
            "omniva_events", "Events by engine type and status", labels=["engine_type", "status"]
        )
        for engine_type, by_status in sorted(events.items()):
            for status, count in sorted(by_status.items()):
                event_family.add_metric([engine_type, status], count)
        yield event_family
        engine_family = GaugeMetricFamily(
            "omniva_engines",
            "Registered engines by type and status (offline derived from heartbeats)",
            labels=["engine_type", "status"],
        )
        for engine_type, by_status in sorted(engines.items()):
            for status, count in sorted(by_status.items()):
                engine_family.add_metric([engine_type, status], count)
        yield engine_family

    def describe(self) -> list:
        return []


class WebCollector(Collector):
    """The request pool of the web process that answers the scrape (omniva/handler.py)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from omniva import audit
        from omniva.handler import pool_stats

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
        from omniva import selectors

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


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(QueueCollector())
        REGISTRY.register(JobCollector())
        REGISTRY.register(EngineCollector())
        REGISTRY.register(WebCollector())
        REGISTRY.register(NotificationQueueCollector())
        _registered = True


register()
