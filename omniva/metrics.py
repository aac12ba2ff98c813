"""Prometheus metrics of Omniva beside django-prometheus's.

Gauges that describe shared state (queue depth and lag) are read from the database
at scrape time, so any node's /metrics tells the truth about the whole deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("omniva.metrics")


class QueueCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        from omniva import selectors

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


_registered = False


def register() -> None:
    global _registered
    if not _registered:
        REGISTRY.register(QueueCollector())
        _registered = True


register()
