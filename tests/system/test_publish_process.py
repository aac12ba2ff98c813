"""A real worker killed between the platform's upload and our commit: the retry sends
the same idempotency key, and the platform keeps one item."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from jobs import services as job_services
from jobs.models import Job, JobStatus
from omniva.models import Clip, Project
from publishing.models import Publication, PublicationStatus
from tests.conftest import ProcessGroup, start_worker, wait_for
from tests.publishing.conftest import (
    FakeWebhook,
    hook_for,
    stop_job_listener,  # noqa: F401 (autouse, as in tests/publishing/)
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def job_status(job: Job) -> str:
    job.refresh_from_db()
    return job.status


def test_a_worker_killed_between_upload_and_commit_publishes_the_item_once(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path, webhook: FakeWebhook
) -> None:
    project = Project.objects.create(name="studio")
    clip = Clip.objects.create(project=project, title="Sunset timelapse")
    hook_for(project, webhook)
    webhook.hold_next = 1  # keeps the item, then answers nothing while the worker waits
    log = tmp_path / "qcluster.log"
    start_worker(
        processes, test_database_url, log, OMNIVA_TASK_LEASE_S="2", OMNIVA_ALLOW_PRIVATE_URLS="1"
    )
    job, _ = job_services.job_submit(pipeline="publish", params={"clip_id": str(clip.pk)})

    assert webhook.received.wait(timeout=60), f"no upload arrived (log: {log.read_text()[-2000:]})"
    worker_pid = int(job.stages.get().worker.rsplit(":", 1)[1])
    os.kill(worker_pid, signal.SIGKILL)  # the platform has the item; we never committed it
    assert Publication.objects.get().status == PublicationStatus.PUBLISHING
    webhook.release.set()

    wait_for(
        lambda: job_status(job) == JobStatus.COMPLETED,
        timeout=60,
        interval=0.1,
        what=f"the stage to run again and complete (log: {log})",
    )
    publication = Publication.objects.get()
    assert (publication.status, publication.external_id, publication.attempts) == (
        PublicationStatus.PUBLISHED, "ext-1", 2,
    )  # fmt: skip
    assert webhook.requests == 2  # sent twice, with one key
    assert len(webhook.items) == 1  # and kept once
    print(f"uploads sent: {webhook.requests}, items on the platform: {len(webhook.items)}")
