"""Waiting for a job to finish (sync submissions).

Every transition that finishes a job someone waits for (`Job.awaited`, set by
`job_await` before the waiter's first read) NOTIFYs `omniva_job_done` with the job's id
in its transaction (jobs/services/); the process's listener (omniva/notifications.py) wakes
the waiters of that id.
"""

from __future__ import annotations

from typing import Any

from jobs.models import JOB_DONE_CHANNEL, Job
from jobs.services.core import job_await
from omniva.notifications import Listener

listener = Listener(JOB_DONE_CHANNEL)


def wait_for_job(job_id: Any, *, timeout_s: float) -> Job:
    """The job once it finished, or as it stands when `timeout_s` ran out."""
    job_await(job_id=job_id)  # before the first read (see job_await)
    return listener.wait_until(
        str(job_id),
        read=lambda: Job.objects.get(pk=job_id),
        done=lambda job: job.is_finished,
        timeout_s=timeout_s,
    )
