"""A job whose only stage completed just after a cancel was requested ends `cancelled`
with nothing left to run: a retry completes it rather than leaving it pending forever."""

from __future__ import annotations

import pytest

from jobs import services
from jobs.models import Job, JobStatus, StageStatus

pytestmark = pytest.mark.django_db


def test_a_retry_of_a_job_cancelled_as_its_last_stage_completed_completes_it() -> None:
    job, _ = services.job_submit(pipeline="noop")
    run = job.stage_list[0]
    claim = services.stage_start(stage_run_id=run.pk, worker="w-1")
    assert claim is not None
    _, finished = services.job_cancel(job_id=job.pk, reason="too late")
    assert not finished  # its stage runs: marked, to stop at the next checkpoint
    services.stage_complete(stage_run_id=run.pk, token=claim.token, output={"done": True})
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.stages.get().status == StageStatus.COMPLETED

    retried = services.job_retry(job_id=job.pk)

    assert retried.status == JobStatus.COMPLETED
    stored = Job.objects.get(pk=job.pk)
    assert stored.status == JobStatus.COMPLETED
    assert stored.finished_at is not None
    assert stored.result == retried.result
