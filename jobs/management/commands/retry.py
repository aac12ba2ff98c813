"""`manage.py retry JOB_ID`: run a failed, cancelled or timed-out job again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs import services
from jobs.models import StageStatus
from omniva.errors import OmnivaError


class Command(BaseCommand):
    help = "Retry a failed, cancelled or timed-out job; only the stages that did not complete run."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("job_id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            job = services.job_retry(job_id=options["job_id"])
        except OmnivaError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        rerun = job.stages.exclude(status=StageStatus.COMPLETED).count()
        total = job.stages.count()
        self.stdout.write(f"Retried job {job.pk}: {job.status}, {rerun} of {total} stages rerun.")
