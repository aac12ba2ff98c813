"""Cancelling a running batch while one of its children finishes: one lock order (the
child, then its parent), so neither side is aborted as a deadlock."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction
from django.utils import timezone

from jobs import services
from jobs.models import Job, JobStatus
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _someone_waits_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0] > 0


def test_cancelling_a_batch_while_a_child_finishes_deadlocks_neither() -> None:
    parent, _ = services.job_submit_batch(items=[{"pipeline": "noop"}, {"pipeline": "noop"}])
    first = parent.children.order_by("created_at", "id").first()
    assert first is not None
    child_locked = threading.Event()
    failures: list[BaseException] = []

    def child_finishing() -> None:
        # What a child's completion does: its own row first, then (in _finish_job) its
        # parent's, here held until the cancel is waiting for the child.
        try:
            with transaction.atomic():
                Job.objects.select_for_update().get(pk=first.pk)
                child_locked.set()
                wait_for(_someone_waits_on_a_lock, timeout=10, what="the cancel to wait on it")
                services.core._batch_child_finished(parent_id=parent.pk, now=timezone.now())
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    finishing = threading.Thread(target=child_finishing)
    finishing.start()
    assert child_locked.wait(timeout=10)
    try:
        job, ended = services.job_cancel(job_id=parent.pk, reason="stop")
    finally:
        finishing.join(timeout=30)

    assert failures == []
    assert ended
    assert job.status == JobStatus.CANCELLED
    assert set(parent.children.values_list("status", flat=True)) == {JobStatus.CANCELLED}
