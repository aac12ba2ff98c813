"""`manage.py requeue EVENT_ID [EVENT_ID …]`: dead-lettered events back to the queue."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from engines import services
from omniva.errors import OmnivaError


class Command(BaseCommand):
    help = "Requeue dead-lettered events with their retries renewed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("event_ids", nargs="+", metavar="EVENT_ID")

    def handle(self, *args: Any, **options: Any) -> None:
        refused: list[str] = []
        # A repeated id would be refused the second time (it is pending by then).
        for event_id in dict.fromkeys(options["event_ids"]):
            try:
                event = services.event_requeue(event_id=event_id)
            except OmnivaError as exc:
                self.stderr.write(f"Event {event_id} not requeued: {exc.code}: {exc.message}")
                refused.append(f"{event_id} ({exc.code})")
                continue
            self.stdout.write(f"Requeued event {event.pk} ({event.event_type.name}).")
        if refused:
            raise CommandError(f"Not requeued: {', '.join(refused)}.")
