"""An attempt that lost its lease stops (issue 19, item 9): another worker took its stage
over, or its job ended by someone else's hand (a sibling stage failed). Its supervisor
sees it at the next heartbeat and interrupts it as a cancel does (StageLeaseLost), so
what the stage would do next (here an upload after long work without checkpoints) does
not happen, and nothing of the new holder's is acknowledged or settled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from jobs import services
from jobs.models import Job, JobStatus, QueueTask, StageRun, StageStatus
from jobs.pipelines.context import StageContext
from tests.conftest import wait_for
from tests.jobs.conftest import claim_one, run_delivery

# A real worker's supervisor commits its heartbeats from its own thread.
pytestmark = pytest.mark.django_db(transaction=True)

# What the stage did, in order ("working", then "uploaded" once its work is done).
EFFECTS: list[str] = []


def _work_then_upload(ctx: StageContext) -> dict[str, Any]:
    EFFECTS.append("working")
    deadline = time.monotonic() + float(ctx.params.get("seconds", 8))
    while time.monotonic() < deadline:
        time.sleep(0.02)  # long work, and no checkpoint on purpose
    EFFECTS.append("uploaded")  # the side effect a lost attempt must not have
    return {"uploaded": True}


def _sibling(ctx: StageContext) -> dict[str, Any]:
    return {}


@pytest.fixture
def uploader() -> Iterator[None]:
    """test_uploader (one stage) and test_uploader_pair (it and a parallel sibling)."""
    from jobs.pipelines.registry import _REGISTRY, Pipeline, Stage, register

    EFFECTS.clear()
    registered = [
        register(
            Pipeline(
                name="test_uploader",
                description="works, then uploads",
                stages=(Stage("work", _work_then_upload),),
                params_schema={"type": "object"},
            )
        ),
        register(
            Pipeline(
                name="test_uploader_pair",
                description="works, then uploads; a sibling beside it",
                stages=(Stage("work", _work_then_upload), Stage("sibling", _sibling)),
                params_schema={"type": "object"},
            )
        ),
    ]
    yield
    for pipeline in registered:
        _REGISTRY.pop(pipeline.name, None)


def meanwhile(act: Callable[[], None]) -> threading.Thread:
    """Run `act` in another thread (another worker) once the stage is working."""

    def run() -> None:
        try:
            wait_for(lambda: "working" in EFFECTS, timeout=10, what="the stage to work")
            act()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def submit(pipeline: str) -> Job:
    job, _ = services.job_submit(pipeline=pipeline, params={"seconds": 8})
    return job


@override_settings(OMNIVA_TASK_LEASE_S=1)
def test_an_attempt_whose_lease_another_worker_took_over_stops_before_its_upload(
    uploader: None,
) -> None:
    job = submit("test_uploader")
    run = job.stages.get()
    taken: dict[str, Any] = {}

    def take_over() -> None:
        # The attempt's lease ran out (its worker was paused past it, say): the task is
        # delivered again and another worker starts the next attempt. One transaction,
        # so the first worker's heartbeat cannot renew the lease in between.
        with transaction.atomic():
            StageRun.objects.filter(pk=run.pk).update(lease_expires_at=timezone.now())
            QueueTask.objects.filter(stage_run_id=run.pk).update(visible_at=timezone.now())
            ack_id, _task = claim_one("default")
            taken["ack_id"] = ack_id
            taken["claim"] = services.stage_start(
                stage_run_id=run.pk, worker="the new holder", ack_id=ack_id
            )

    thread = meanwhile(take_over)
    started = time.monotonic()
    ack_id, task = claim_one("default")
    run_delivery(ack_id, task)  # returns once the supervisor stopped the lost attempt
    thread.join()

    assert taken["claim"] is not None
    assert taken["claim"].attempt == 2
    assert EFFECTS == ["working"], "the lost attempt went on to its upload"
    assert time.monotonic() - started < 6
    # The new holder's attempt is untouched: running under its token, its delivery kept.
    run.refresh_from_db()
    assert run.status == StageStatus.RUNNING
    assert str(run.lease_token) == taken["claim"].token
    row = QueueTask.objects.get(stage_run_id=run.pk)
    assert f"{row.pk}:{row.deliveries}" == taken["ack_id"]
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING


@override_settings(OMNIVA_TASK_LEASE_S=1)
def test_an_attempt_whose_job_failed_in_a_sibling_stage_stops_before_its_upload(
    uploader: None,
) -> None:
    job = submit("test_uploader_pair")
    sibling = job.stages.get(name="sibling")
    QueueTask.objects.filter(stage_run_id=sibling.pk).delete()  # another worker runs it

    def sibling_fails() -> None:
        claim = services.stage_start(stage_run_id=sibling.pk, worker="another worker")
        assert claim is not None
        services.stage_fail(
            stage_run_id=sibling.pk,
            token=claim.token,
            code="BROKEN",
            message="the sibling broke",
            retryable=False,
        )

    thread = meanwhile(sibling_fails)
    started = time.monotonic()
    ack_id, task = claim_one("default")
    run_delivery(ack_id, task)
    thread.join()

    assert EFFECTS == ["working"], "the attempt of an ended job went on to its upload"
    assert time.monotonic() - started < 6
    job.refresh_from_db()
    assert (job.status, job.error["code"]) == (JobStatus.FAILED, "BROKEN")
    assert job.stages.get(name="work").status == StageStatus.CANCELLED
