"""A child retried after its batch ended reopens the batch, whose outcome is settled anew
when that child ends."""

from __future__ import annotations

from typing import Any

import pytest

from jobs import services
from jobs.models import Job, JobStatus

pytestmark = pytest.mark.django_db


def test_retrying_a_child_of_an_ended_batch_reopens_it_and_settles_it_again(drain: Any) -> None:
    parent, _ = services.job_submit_batch(items=[{"pipeline": "noop"}, {"pipeline": "noop"}])
    first, _ = parent.children.order_by("created_at", "id")
    services.job_cancel(job_id=first.pk, reason="not now")
    drain()
    parent.refresh_from_db()
    assert parent.status == JobStatus.COMPLETED
    assert parent.result["total"] == 2
    assert len(parent.result["errors"]) == 1

    services.job_retry(job_id=first.pk)

    parent.refresh_from_db()
    assert parent.status == JobStatus.RUNNING
    assert (parent.finished_at, parent.result) == (None, None)
    assert parent.progress == 50.0
    drain()
    parent.refresh_from_db()
    assert parent.status == JobStatus.COMPLETED
    assert len(parent.result["results"]) == 2
    assert parent.result["errors"] == []
    assert Job.objects.get(pk=first.pk).status == JobStatus.COMPLETED
