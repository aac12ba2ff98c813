"""Publishing runs its stages through the in-process worker of the job-engine tests."""

from __future__ import annotations

from tests.jobs.conftest import drain, due, stop_job_listener

__all__ = ["drain", "due", "stop_job_listener"]
