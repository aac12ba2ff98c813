"""Job-engine fixtures: an in-process worker that claims through the broker's own SQL.

`drain` is a real worker minus the process: it claims rows with the broker's claim
statement (priority, leases, SKIP LOCKED), unpacks the signed django-q2 task, runs
`jobs.tasks.run_stage` and acknowledges the delivery. It uses Django's connection, so
it sees what a test wrote inside its transaction; tests about processes start
`qcluster` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.utils import timezone

from jobs import testing
from jobs.models import Job, QueueTask


@dataclass
class Drained:
    ran: list[str] = field(default_factory=list)  # task names in the order they started

    def __len__(self) -> int:
        return len(self.ran)


# The in-process worker's two steps, apart for tests that act in between.
claim_one = testing.claim_delivery
run_delivery = testing.run_delivery


@pytest.fixture
def drain(db: None) -> Callable[..., Drained]:
    def drain(queue: str = "default", *, limit: int = 10_000) -> Drained:
        drained = Drained()
        while len(drained) < limit:
            claimed = claim_one(queue)
            if claimed is None:
                return drained
            ack_id, task = claimed
            drained.ran.append(task["name"])
            run_delivery(ack_id, task)
        return drained

    return drain


def make_due(job: Job) -> None:
    """Bring every delayed queue row of `job` due now (instead of waiting out a backoff)."""
    QueueTask.objects.filter(stage_run_id__in=job.stages.values("pk")).update(
        visible_at=timezone.now()
    )


@pytest.fixture
def due() -> Callable[[Job], None]:
    return make_due


@pytest.fixture(autouse=True)
def stop_job_listener() -> Any:
    """Sync waits start a LISTEN thread; stop it so no connection outlives the test."""
    yield
    from jobs import gpu_worker, waiting

    waiting.listener.stop()
    gpu_worker.listener.stop()


@pytest.fixture(autouse=True)
def fresh_saturation_cache() -> None:
    """The queue-depth cache is per process; a test must not see the previous test's."""
    from jobs import services

    services.queue_depths_forget()


# A pipeline only the tests know (they run its stages in-process with `drain`): `first`
# then `second`; `second` fails while `fail_second` is set in RUNS. RUNS counts the
# runs of each stage.
RUNS: dict[str, int] = {}


def _first(ctx: Any) -> dict[str, Any]:
    RUNS["first"] = RUNS.get("first", 0) + 1
    return {"from": "first"}


def _second(ctx: Any) -> dict[str, Any]:
    from jobs.pipelines.context import StageError

    RUNS["second"] = RUNS.get("second", 0) + 1
    if RUNS.get("fail_second"):
        raise StageError("BROKEN", "second is broken", retryable=False)
    return {"got": ctx.inputs["first"]}


def _stubborn(ctx: Any) -> dict[str, Any]:
    import time

    RUNS["stubborn_started"] = RUNS.get("stubborn_started", 0) + 1
    time.sleep(float(ctx.params.get("seconds", 10)))  # no checkpoint on purpose
    RUNS["stubborn_finished"] = RUNS.get("stubborn_finished", 0) + 1
    return {}


def _unserializable(ctx: Any) -> dict[str, Any]:
    return {"ratio": float("nan")}  # json.dumps writes NaN, which PostgreSQL refuses


@pytest.fixture
def two_stage_pipeline() -> Any:
    """test_two_stage (first → second), test_stubborn (ignores cancels) and
    test_unserializable (returns what JSON cannot hold)."""
    from jobs.pipelines.registry import _REGISTRY, Pipeline, Stage, register

    RUNS.clear()
    pipeline = register(
        Pipeline(
            name="test_two_stage",
            description="first → second",
            stages=(Stage("first", _first), Stage("second", _second, depends_on=("first",))),
        )
    )
    stubborn = register(
        Pipeline(
            name="test_stubborn",
            description="sleeps without checkpoints",
            stages=(Stage("stubborn", _stubborn),),
            params_schema={"type": "object"},
        )
    )
    unserializable = register(
        Pipeline(
            name="test_unserializable",
            description="returns NaN",
            stages=(Stage("bad", _unserializable),),
        )
    )
    yield pipeline
    for registered in (pipeline, stubborn, unserializable):
        _REGISTRY.pop(registered.name, None)
