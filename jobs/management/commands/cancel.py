"""`manage.py cancel JOB_ID [--reason R]`."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import services
from omniva.errors import OmnivaError


class Command(BaseCommand):
    help = "Cancel a job: a waiting one at once, a running one at its next checkpoint."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("job_id")
        parser.add_argument("--reason", default="cancelled from the command line")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            job, finished_now = services.job_cancel(
                job_id=options["job_id"], reason=options["reason"]
            )
        except OmnivaError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        if finished_now:
            self.stdout.write(f"Cancelled job {job.pk}.")
        else:
            self.stdout.write(
                f"Cancel requested for job {job.pk}; it stops at its running stage's next "
                "checkpoint."
            )
