"""`manage.py cleanup [--max-age-s N] [--status S …]`: delete old finished jobs, and the
audit records and activity rows older than their retention settings; move events whose
last lease ran out to the dead letter queue (a claim of their engine type would)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from engines import services as engines
from jobs import services
from jobs.models import FINISHED_STATUSES
from omniva import services as core_services
from omniva.errors import OmnivaError


class Command(BaseCommand):
    help = "Delete finished jobs (with their stages, logs and files) that ended long enough ago."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age-s",
            type=int,
            default=86400,
            help="Delete jobs that finished over this many seconds ago (86400).",
        )
        parser.add_argument(
            "--status",
            action="append",
            dest="statuses",
            choices=[str(status) for status in FINISHED_STATUSES],
            help="Repeat for several; default every finished status.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["max_age_s"] < 0:
            raise CommandError("--max-age-s is at least 0.")
        try:
            cleared = services.jobs_cleanup(
                max_age_s=options["max_age_s"], statuses=options["statuses"]
            )
        except OmnivaError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        noun = "job" if cleared == 1 else "jobs"
        self.stdout.write(f"Cleared {cleared} {noun} finished over {options['max_age_s']} s ago.")
        audit_days = settings.OMNIVA_AUDIT_RETENTION_DAYS
        audited = core_services.audit_records_prune(older_than=timedelta(days=audit_days))
        self.stdout.write(f"Pruned {audited} audit records older than {audit_days} days.")
        activity_days = settings.OMNIVA_ACTIVITY_RETENTION_DAYS
        pruned = core_services.activity_prune(older_than=timedelta(days=activity_days))
        self.stdout.write(f"Pruned {pruned} activity rows older than {activity_days} days.")
        dead = engines.events_dead_letter_exhausted()
        self.stdout.write(f"Moved {dead} events whose last lease ran out to the dead letter queue.")
