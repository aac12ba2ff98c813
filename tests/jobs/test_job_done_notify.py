"""The job-done NOTIFY goes only where someone waits (Job.awaited, issue 21): a job
nobody waits on finishes without one, a waited one notifies its waiters, and a waiter
that comes to a job submitted unwaited marks it first, so it is still woken."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from django.db import connection

from jobs import services, waiting
from jobs.models import JOB_DONE_CHANNEL, Job, JobStatus
from omniva.notifications import own_connection_params
from tests.conftest import wait_for
from tests.jobs.conftest import claim_one, run_delivery

pytestmark = pytest.mark.django_db(transaction=True)

SENTINEL = "sentinel"


def job_done_notifies(transitions: Callable[[], None]) -> list[str]:
    """The payloads on JOB_DONE_CHANNEL while `transitions` run; a notify of our own sent
    after them marks the end (notifications arrive in commit order)."""
    with psycopg.connect(**own_connection_params(), autocommit=True) as listener:
        listener.execute(f'LISTEN "{JOB_DONE_CHANNEL}"')
        transitions()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [JOB_DONE_CHANNEL, SENTINEL])
        payloads = []
        for notify in listener.notifies(timeout=30):
            if notify.payload == SENTINEL:
                break
            payloads.append(notify.payload)
    return payloads


def test_jobs_nobody_waits_on_finish_without_a_job_done_notify() -> None:
    def finish_unwaited() -> None:
        services.job_submit(pipeline="noop")
        run_delivery(*claim_one("default"))  # the one-statement completion
        pending, _ = services.job_submit(pipeline="noop")
        services.job_cancel(job_id=pending.pk)  # a Python transition

    assert job_done_notifies(finish_unwaited) == []


def test_a_waited_job_notifies_when_it_finishes_by_either_path() -> None:
    jobs: list[Job] = []

    def finish_waited() -> None:
        jobs.append(services.job_submit(pipeline="noop", awaited=True)[0])
        run_delivery(*claim_one("default"))
        jobs.append(services.job_submit(pipeline="noop", awaited=True)[0])
        services.job_cancel(job_id=jobs[-1].pk)

    assert job_done_notifies(finish_waited) == [str(job.pk) for job in jobs]


def test_a_waiter_that_comes_to_an_unwaited_job_marks_it_and_is_woken() -> None:
    job, _ = services.job_submit(pipeline="noop")
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            outcome["job"] = waiting.wait_for_job(job.pk, timeout_s=120)
        finally:
            connection.close()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    wait_for(lambda: Job.objects.get(pk=job.pk).awaited, timeout=30, what="the mark")
    run_delivery(*claim_one("default"))

    # Woken by the NOTIFY, not by its 120 s running out.
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert outcome["job"].status == JobStatus.COMPLETED


def test_a_sync_submission_of_a_known_key_marks_its_job_awaited() -> None:
    first, _ = services.job_submit(pipeline="noop", idempotency_key="k")
    again, created = services.job_submit(pipeline="noop", idempotency_key="k", awaited=True)

    assert (again.pk, created) == (first.pk, False)
    assert Job.objects.get(pk=first.pk).awaited
