"""The Prometheus collectors of jobs: queue depth and lag, and the job figures tallied up
to a cursor (jobs.models.MetricTally, moved by each scrape): a scrape reads the tallies
and the rows since, and the retention pass deleting old jobs lowers no counter.
Registered from JobsConfig.ready (omniva/metrics.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jobs import selectors, services
from omniva.metrics import histogram_family, register_collector

logger = logging.getLogger("omniva.metrics")


class QueueCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
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


class JobCollector(Collector):
    def collect(self) -> Iterator:
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
        yield histogram_family(
            "omniva_job_duration_seconds",
            "Run time of completed jobs",
            ["pipeline"],
            histograms["jobs"],
            selectors.DURATION_BUCKETS,
        )
        yield histogram_family(
            "omniva_stage_duration_seconds",
            "Run time of completed stage attempts",
            ["pipeline", "stage", "queue"],
            histograms["stages"],
            selectors.DURATION_BUCKETS,
        )

    def describe(self) -> list:
        return []


def register_collectors() -> None:
    register_collector(QueueCollector())
    register_collector(JobCollector())
