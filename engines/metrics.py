"""The Prometheus collector of engines: events by type and status, engines by type and
status. Registered from EnginesConfig.ready (omniva/metrics.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engines import selectors
from omniva.metrics import register_collector

logger = logging.getLogger("omniva.metrics")


class EngineCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
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


def register_collectors() -> None:
    register_collector(EngineCollector())
