"""`manage.py jobs [--status S …] [--pipeline P] [--limit N]`: the newest jobs as a table."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from jobs.models import Job, JobStatus
from jobs.selectors import format_duration, run_time_ms


class Command(BaseCommand):
    help = "List jobs, newest first."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--status",
            action="append",
            dest="statuses",
            choices=JobStatus.values,
            help="Repeat for several statuses.",
        )
        parser.add_argument("--pipeline")
        parser.add_argument("--limit", type=int, default=50, help="At most this many (50).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["limit"] < 1:
            raise CommandError("--limit is at least 1.")
        query = Job.objects.order_by("-created_at")
        if options["statuses"]:
            query = query.filter(status__in=options["statuses"])
        if options["pipeline"]:
            query = query.filter(pipeline=options["pipeline"])
        jobs = list(query[: options["limit"]])
        if not jobs:
            self.stdout.write("No jobs.")
            return
        rows = [("ID", "PIPELINE", "STATUS", "PRIORITY", "PROGRESS", "ATTEMPTS", "CREATED", "RUN")]
        for job in jobs:
            rows.append(
                (
                    str(job.pk),
                    job.pipeline,
                    job.status,
                    str(job.priority),
                    f"{job.progress:.0f}%",
                    str(job.attempts),
                    timezone.localtime(job.created_at).strftime("%Y-%m-%d %H:%M:%S"),
                    format_duration(run_time_ms(job)),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
