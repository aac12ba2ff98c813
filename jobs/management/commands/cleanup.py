"""`manage.py cleanup [--max-age-s N] [--status S …]`: one retention pass now, the one the
`omniva:retention` django-q2 schedule runs every ten minutes (jobs.services.retention_run),
to the end: take events past their deadline out of the queue and move those whose last
lease ran out to the dead letter queue (a claim of their engine type would), then delete,
in batches of one short transaction each, activity rows, audit records, completed and
dead-lettered events past their retention settings, and finished jobs with their stages,
logs and files (past OMNIVA_JOB_RETENTION_DAYS, or --max-age-s)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import services
from jobs.models import FINISHED_STATUSES
from omniva.errors import OmnivaError


class Command(BaseCommand):
    help = (
        "Run a retention pass now: delete finished jobs (with their stages, logs and files), "
        "activity rows, audit records and finished events past their retention, in batches."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age-s",
            type=int,
            default=None,
            help="Delete jobs that finished over this many seconds ago "
            "(default OMNIVA_JOB_RETENTION_DAYS).",
        )
        parser.add_argument(
            "--status",
            action="append",
            dest="statuses",
            choices=[str(status) for status in FINISHED_STATUSES],
            help="Repeat for several; default every finished status.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        max_age_s = options["max_age_s"]
        if max_age_s is None:
            max_age_s = settings.OMNIVA_JOB_RETENTION_DAYS * 86400
        if max_age_s < 0:
            raise CommandError("--max-age-s is at least 0.")
        try:
            pruned = services.retention_run(job_max_age_s=max_age_s, statuses=options["statuses"])
        except OmnivaError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        noun = "job" if pruned["jobs"] == 1 else "jobs"
        self.stdout.write(f"Cleared {pruned['jobs']} {noun} finished over {max_age_s} s ago.")
        self.stdout.write(
            f"Pruned {pruned['audit_records']} audit records older than "
            f"{settings.OMNIVA_AUDIT_RETENTION_DAYS} days."
        )
        self.stdout.write(
            f"Pruned {pruned['activity']} activity rows older than "
            f"{settings.OMNIVA_ACTIVITY_RETENTION_DAYS} days."
        )
        self.stdout.write(
            f"Pruned {pruned['events']} finished events older than "
            f"{settings.OMNIVA_EVENT_RETENTION_DAYS} days."
        )
        self.stdout.write(
            f"Took {pruned['timed_out']} events past their deadline out of the queue "
            "(their jobs timed out)."
        )
        self.stdout.write(
            f"Moved {pruned['dead_lettered']} events whose last lease ran out to the dead "
            "letter queue."
        )
