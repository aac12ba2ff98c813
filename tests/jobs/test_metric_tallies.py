"""The Prometheus job figures (omniva/metrics.py) are tallied up to a cursor: a scrape
reads only the rows finished since, and the retention pass lowers no counter."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import selectors, services
from jobs.models import Job, JobStatus, StageRun, StageStatus
from tests.conftest import rows_read_by

pytestmark = pytest.mark.django_db


def _finished_jobs(count: int, *, days_ago: float) -> None:
    finished = timezone.now() - timedelta(days=days_ago)
    jobs = Job.objects.bulk_create(
        Job(
            pipeline="noop",
            status=JobStatus.COMPLETED,
            created_at=finished - timedelta(seconds=2),
            started_at=finished - timedelta(seconds=1),
            finished_at=finished,
        )
        for _ in range(count)
    )
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(
        created_at=finished - timedelta(seconds=2)  # auto_now_add set it to now
    )
    StageRun.objects.bulk_create(
        StageRun(
            job=job,
            name="noop",
            queue="default",
            status=StageStatus.COMPLETED,
            started_at=finished - timedelta(seconds=1),
            finished_at=finished,
        )
        for job in jobs
    )


def _scraped(client: Any) -> dict[str, float]:
    text = client.get("/metrics").content.decode()
    wanted = (
        'omniva_jobs_submitted_total{pipeline="noop"}',
        'omniva_jobs_finished_total{pipeline="noop",status="completed"}',
        'omniva_job_duration_seconds_count{pipeline="noop"}',
        'omniva_stage_duration_seconds_count{pipeline="noop",queue="default",stage="noop"}',
    )
    found = {}
    for name in wanted:
        match = re.search(re.escape(name) + r" ([0-9.e+]+)", text)
        found[name.split("{")[0]] = float(match.group(1)) if match else 0.0
    return found


def test_the_prometheus_job_counters_do_not_drop_when_retention_deletes_old_jobs(
    client: Any,
) -> None:
    _finished_jobs(30, days_ago=8)
    before = _scraped(client)
    assert set(before.values()) == {30.0}

    pruned = services.retention_run()
    assert pruned["jobs"] == 30
    assert not Job.objects.exists()

    _finished_jobs(2, days_ago=0)  # and two more since
    assert set(_scraped(client).values()) == {32.0}


def test_the_tallies_and_the_rows_since_their_cursor_add_up_to_every_row() -> None:
    _finished_jobs(7, days_ago=3)
    assert services.metric_tallies_advance()
    _finished_jobs(5, days_ago=0)  # inside the settling minute: read, not tallied

    assert selectors.metric_figures() == selectors.metric_window(after=None, until=None)
    figures = selectors.metric_figures()
    assert figures[("finished", ("noop", "completed"))]["count"] == 12
    assert services.metric_tallies_advance()
    assert selectors.metric_figures() == figures


def test_a_scrape_reads_only_the_rows_finished_since_the_tallies_cursor() -> None:
    _finished_jobs(300, days_ago=2)
    assert services.metric_tallies_advance()
    _finished_jobs(3, days_ago=0)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE jobs_job, jobs_stagerun")

    with CaptureQueriesContext(connection) as queries:
        selectors.metric_figures()

    reads = rows_read_by(queries.captured_queries, {"jobs_job", "jobs_stagerun"})
    assert reads
    too_many = [read for read in reads if read[1] > 20]
    assert not too_many, too_many
