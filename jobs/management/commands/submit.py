"""`manage.py submit PIPELINE --param k=v … [--priority P] [--wait]`.

Prints the new job's id. With --wait it shows a progress bar while it polls the job,
then prints the job's final state as JSON and exits 0 when it completed, 1 when it
failed, was cancelled or timed out, and 2 when the wait ran out first.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from tqdm import tqdm

from jobs import services
from jobs.models import Job, JobStatus
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Project

POLL_S = 0.25
EXIT_COMPLETED = 0
EXIT_UNSUCCESSFUL = 1
EXIT_WAIT_TIMED_OUT = 2
EXIT_INTERRUPTED = 130


def parse_param(text: str) -> tuple[str, Any]:
    """`k=v`: v as JSON when it parses (`n=5` is 5, `tags=["a"]` a list), else the string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CommandError(f"--param takes key=value, not {text!r}.")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def parse_priority_option(text: str) -> int | str:
    return int(text) if text.strip().lstrip("-").isdigit() else text


class _TqdmStream:
    """A file for tqdm over a command's OutputWrapper (which would end every write with a
    newline and so break the bar's carriage returns)."""

    def __init__(self, wrapper: OutputWrapper) -> None:
        self.wrapper = wrapper

    def write(self, text: str) -> None:
        self.wrapper.write(text, ending="")

    def flush(self) -> None:
        self.wrapper.flush()


def job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": str(job.pk),
        "pipeline": job.pipeline,
        "status": job.status,
        "progress": job.progress,
        "attempts": job.attempts,
        "result": job.result,
        "error": job.error,
        "queue_time_ms": job.queue_time_ms,
        "run_time_ms": job.run_time_ms,
    }


class Command(BaseCommand):
    help = "Submit a job; --wait follows it (exit 0 completed, 1 not, 2 the wait ran out)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("pipeline")
        parser.add_argument(
            "--param",
            action="append",
            dest="params",
            default=[],
            metavar="KEY=VALUE",
            help="Repeatable. The value is read as JSON when it parses, else as a string.",
        )
        parser.add_argument(
            "--priority",
            type=parse_priority_option,
            default=5,
            help="0-10 or low, normal, high, urgent (default normal).",
        )
        parser.add_argument("--max-retries", type=int, help="Retries of a failing stage.")
        parser.add_argument("--timeout-s", type=int, help="Run time limit in seconds.")
        parser.add_argument("--queue-timeout-s", type=int, help="Limit on the wait to start.")
        parser.add_argument("--idempotency-key", help="The same key returns the first job.")
        parser.add_argument("--project", help="The id of the project the job belongs to.")
        parser.add_argument("--wait", action="store_true", help="Follow the job to its end.")
        parser.add_argument(
            "--wait-timeout-s",
            type=float,
            default=3600.0,
            help="Give up waiting after this many seconds (exit 2; the job keeps going).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        params = dict(parse_param(text) for text in options["params"])
        try:
            job, created = services.job_submit(
                pipeline=options["pipeline"],
                params=params,
                priority=options["priority"],
                max_retries=options["max_retries"],
                timeout_s=options["timeout_s"],
                queue_timeout_s=options["queue_timeout_s"],
                project=self._project(options["project"]),
                idempotency_key=options["idempotency_key"],
            )
        except OmnivaError as exc:
            raise CommandError(_describe(exc)) from None
        if not created:
            self.stderr.write(f"Idempotency key {options['idempotency_key']!r} names this job:")
        self.stdout.write(str(job.pk))
        if not options["wait"]:
            return
        try:
            job = self._follow(
                job, timeout_s=options["wait_timeout_s"], bar=options["verbosity"] > 0
            )
        except KeyboardInterrupt:
            self.stderr.write(f"Stopped waiting; job {job.pk} goes on.")
            sys.exit(EXIT_INTERRUPTED)
        self.stdout.write(json.dumps(job_summary(job), indent=2))
        if not job.is_finished:
            self.stderr.write(
                f"Still {job.status} after {options['wait_timeout_s']:g} s; the job goes on."
            )
            sys.exit(EXIT_WAIT_TIMED_OUT)
        if job.status != JobStatus.COMPLETED:
            error = job.error or {}
            detail = f": {error.get('code')}: {error.get('message')}" if error else ""
            self.stderr.write(f"Job {job.status}{detail}")
            sys.exit(EXIT_UNSUCCESSFUL)

    def _project(self, project_id: str | None) -> Project | None:
        if not project_id:
            return None
        try:
            return Project.objects.get(pk=project_id)
        except (Project.DoesNotExist, ValidationError, ValueError):
            raise CommandError(f"PROJECT_NOT_FOUND: No project with id {project_id!r}.") from None

    def _follow(self, job: Job, *, timeout_s: float, bar: bool) -> Job:
        """Poll the job row until it finished or `timeout_s` passed; draw the bar meanwhile."""
        deadline = time.monotonic() + timeout_s
        with tqdm(
            total=100,
            desc=f"{job.pipeline} {job.status}",
            unit="%",
            file=_TqdmStream(self.stderr),
            disable=not bar,
            dynamic_ncols=False,
            ncols=80,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
        ) as progress:
            while True:
                job = self._read(job)
                progress.n = min(100.0, job.progress)
                progress.set_description_str(f"{job.pipeline} {job.status}", refresh=False)
                progress.refresh()
                if job.is_finished or time.monotonic() >= deadline:
                    return job
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))

    def _read(self, job: Job) -> Job:
        # Waiting with no worker or engine to end it: the read times it out (DESIGN.md 4).
        [fresh] = services.jobs_settle_due(jobs=[Job.objects.get(pk=job.pk)])
        return fresh


def _describe(exc: OmnivaError) -> str:
    text = f"{exc.code}: {exc.message}"
    if exc.details and exc.code == ErrorCode.VALIDATION_ERROR:
        text += f" {json.dumps(exc.details)}"
    return text
