"""`manage.py engines [--type T] [--status S] [--json]`: the engines as a table, then the
events by engine type and status."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Count, QuerySet
from django.utils import timezone

from engines.admin import engine_status, format_age, heartbeat_age_s
from engines.models import EngineInstance, EngineStatus, Event, EventStatus, offline_before
from engines.selectors import with_held_events

if TYPE_CHECKING:
    from engines.models import EngineWithHeldEvents


class Command(BaseCommand):
    help = "List engines (status offline when their heartbeat stopped) and count events."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--type", dest="engine_type", help="Only this engine type.")
        parser.add_argument(
            "--status",
            choices=EngineStatus.values,
            help="Only engines in this status (offline: no heartbeat for a while).",
        )
        parser.add_argument("--json", action="store_true", help="Print JSON instead.")

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        engines = cast(
            "QuerySet[EngineWithHeldEvents]",
            with_held_events(EngineInstance.objects.order_by("engine_type", "name")),
        )
        events = Event.objects.all()
        if options["engine_type"]:
            engines = engines.filter(engine_type=options["engine_type"])
            events = events.filter(engine_type=options["engine_type"])
        status = options["status"]
        if status == EngineStatus.OFFLINE:
            engines = engines.filter(last_heartbeat__lt=offline_before(now))
        elif status:
            engines = engines.filter(
                reported_status=status, last_heartbeat__gte=offline_before(now)
            )

        counts: dict[str, dict[str, int]] = {}
        for engine_type, event_status, n in (
            events.order_by().values_list("engine_type", "status").annotate(n=Count("id"))
        ):
            per_type = counts.setdefault(engine_type, dict.fromkeys(EventStatus.values, 0))
            per_type[event_status] = n
        counts = dict(sorted(counts.items()))

        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "engines": [_engine_json(engine, now) for engine in engines],
                        "events": counts,
                    },
                    indent=2,
                )
            )
            return

        rows = [("NAME", "TYPE", "STATUS", "HEARTBEAT", "WORKLOAD", "HELD")]
        for engine in engines:
            rows.append(
                (
                    engine.name,
                    engine.engine_type,
                    engine_status(engine, now),
                    format_age(heartbeat_age_s(engine, now)),
                    str(engine.current_workload),
                    str(engine.held_events),
                )
            )
        if len(rows) > 1:
            self._table(rows)
        else:
            self.stdout.write("No engines.")
        self.stdout.write("")
        if not counts:
            self.stdout.write("No events.")
            return
        self.stdout.write("Events by engine type and status:")
        statuses = EventStatus.values
        summary = [("TYPE", *(s.upper() for s in statuses), "TOTAL")]
        for engine_type, per_status in counts.items():
            summary.append(
                (
                    engine_type,
                    *(str(per_status[s]) for s in statuses),
                    str(sum(per_status.values())),
                )
            )
        self._table(summary)

    def _table(self, rows: Sequence[tuple[str, ...]]) -> None:
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )


def _engine_json(engine: EngineWithHeldEvents, now: datetime) -> dict[str, Any]:
    return {
        "id": str(engine.pk),
        "name": engine.name,
        "engine_type": engine.engine_type,
        "status": engine_status(engine, now),
        "reported_status": engine.reported_status,
        "last_heartbeat": engine.last_heartbeat.isoformat(),
        "heartbeat_age_s": heartbeat_age_s(engine, now),
        "current_workload": engine.current_workload,
        "held_events": engine.held_events,
        "resource_utilization": engine.resource_utilization,
    }
