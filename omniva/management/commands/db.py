"""`manage.py db start|stop|status|url`: the embedded PostgreSQL server by hand."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from omniva.embedded_db import EmbeddedServer


def embedded_server() -> EmbeddedServer:
    if settings.DATABASE_URL:
        raise CommandError("DATABASE_URL is set: the database is external, not embedded.")
    return EmbeddedServer(settings.VAR_DIR / "pg", database=settings.DATABASES["default"]["NAME"])


class Command(BaseCommand):
    help = (
        "Start, stop or inspect the embedded PostgreSQL server (used when DATABASE_URL is unset)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["start", "stop", "status", "url"])

    def handle(self, *args: Any, **options: Any) -> None:
        server = embedded_server()
        action = options["action"]
        if action == "start":
            outcome = server.start(owner_pid=None)
            self.stdout.write(
                f"PostgreSQL {outcome} in {server.pgdata} (stop it with `manage.py db stop`)."
            )
        elif action == "stop":
            stopped = server.stop()
            self.stdout.write("Stopped." if stopped else "It was not running.")
        elif action == "status":
            pid = server.running_pid()
            state = f"running (pid {pid}, owner {server.owner() or 'none'})" if pid else "stopped"
            self.stdout.write(f"{server.pgdata}: {state}")
        else:
            self.stdout.write(server.url())
