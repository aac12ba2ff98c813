"""One job's trouble stays its own in a gpu micro-batch (issue 19, item 6): the batch's
first job stopped (cancel, deadline) puts the others back uncounted; a forward pass that
raises is split down to the input that makes it raise; each job's deadline and cancel
end it on its own; the batch is bounded by items, the first job's included; and one
job's settlement failing undoes none of the others'. Driven by the in-process worker
(`drain`) with the real model on the CPU, its forward pass wrapped where a test needs a
slow device or a failing one."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from jobs import services
from jobs.models import Job, JobLog, JobStatus, QueueTask, StageRun
from jobs.pipelines.context import StageContext
from jobs.pipelines.lib.inference import models

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_batch_stats() -> None:
    models.stats.clear()


def submit(pipeline: str, params: dict[str, Any], **kwargs: Any) -> Job:
    job, _ = services.job_submit(pipeline=pipeline, params=params, **kwargs)
    return job


def embed_texts(texts: list[str], **kwargs: Any) -> Job:
    return submit("embed_texts", {"texts": texts}, **kwargs)


def fresh(job: Job) -> Job:
    return Job.objects.get(pk=job.pk)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[list[str]]]:
    """Wrap the model's forward passes with `trouble(texts, n)` (n counts the calls from
    0), which may wait or raise first; the texts of every pass that reached the model
    are returned."""
    embed = models.embed
    seen: list[list[str]] = []
    calls = {"n": 0}
    trouble: dict[str, Callable[[list[str], int], None]] = {}

    def forward_pass(texts: list[str], **kwargs: Any) -> Any:
        n = calls["n"]
        calls["n"] += 1
        if "hook" in trouble:
            trouble["hook"](list(texts), n)
        seen.append(list(texts))
        return embed(texts, **kwargs)

    monkeypatch.setattr(models, "embed", forward_pass)

    def install(hook: Callable[[list[str], int], None] | None = None) -> list[list[str]]:
        if hook is not None:
            trouble["hook"] = hook
        return seen

    return install


@pytest.mark.django_db(transaction=True)  # the supervisor's heartbeats commit in its thread
@pytest.mark.parametrize("trouble", ["cancelled", "timed_out"])
def test_a_first_job_cancelled_or_timed_out_releases_its_batch_mates_without_charging_them(
    drain: Callable[..., Any], passes: Callable[..., list[list[str]]], trouble: str
) -> None:
    first = embed_texts(
        ["the first"], max_retries=0, timeout_s=1 if trouble == "timed_out" else 600
    )
    mates = [embed_texts([f"mate {n}"], max_retries=0) for n in range(3)]

    def slow_first_pass(texts: list[str], n: int) -> None:
        if n == 0:
            if trouble == "cancelled":
                services.job_cancel(job_id=first.pk, reason="not needed")
            time.sleep(20)  # a slow device: the supervisor stops the batch

    seen = passes(slow_first_pass)
    started = time.monotonic()
    with override_settings(
        OMNIVA_GPU_MAX_BATCH=64,
        OMNIVA_GPU_MAX_WAIT_MS=0,
        OMNIVA_TASK_LEASE_S=1,
        OMNIVA_CANCEL_GRACE_S=1,
    ):
        drain("gpu")
    assert time.monotonic() - started < 15

    assert fresh(first).status == trouble
    for mate in mates:
        job = fresh(mate)
        run = StageRun.objects.get(job=mate)
        # Run again at once, as the attempt it was: neither its retries nor `attempts`
        # count the batch it was stopped in.
        assert (job.status, job.attempts, run.attempt) == (JobStatus.COMPLETED, 1, 1), job.error
        assert JobLog.objects.filter(job=mate, message__contains="released, not counted").exists()
    assert sorted(seen[-1]) == sorted(f"mate {n}" for n in range(3))
    assert not QueueTask.objects.exists()


def test_a_forward_pass_that_raises_fails_only_the_job_whose_input_makes_it_raise(
    drain: Callable[..., Any], passes: Callable[..., list[list[str]]]
) -> None:
    texts = ["alpha", "beta", "poison", "delta", "epsilon"]
    jobs = [embed_texts([text], max_retries=0) for text in texts]

    def driver_error_on_poison(texts: list[str], n: int) -> None:
        if "poison" in texts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    passes(driver_error_on_poison)
    with override_settings(OMNIVA_GPU_MAX_BATCH=64, OMNIVA_GPU_MAX_WAIT_MS=0):
        drain("gpu")

    statuses = {text: fresh(job).status for text, job in zip(texts, jobs, strict=True)}
    assert statuses == {
        "alpha": JobStatus.COMPLETED,
        "beta": JobStatus.COMPLETED,
        "poison": JobStatus.FAILED,
        "delta": JobStatus.COMPLETED,
        "epsilon": JobStatus.COMPLETED,
    }
    poisoned = fresh(jobs[2])
    assert poisoned.error["code"] == "STAGE_FAILED"
    assert "illegal memory access" in poisoned.error["message"]
    # The others' vectors are theirs, as if embedded alone.
    for text, job in zip(texts, jobs, strict=True):
        if text != "poison":
            alone = models.embed([text])[0]
            assert cosine(fresh(job).result["vectors"][0], alone) > 0.9999


def test_a_batch_too_large_for_the_device_is_split_until_it_fits_and_every_job_completes(
    drain: Callable[..., Any], passes: Callable[..., list[list[str]]]
) -> None:
    jobs = [embed_texts([f"text {n}"], max_retries=0) for n in range(6)]

    def out_of_memory_above_two(texts: list[str], n: int) -> None:
        if len(texts) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    seen = passes(out_of_memory_above_two)
    with override_settings(OMNIVA_GPU_MAX_BATCH=64, OMNIVA_GPU_MAX_WAIT_MS=0):
        drain("gpu")

    assert [fresh(job).status for job in jobs] == [JobStatus.COMPLETED] * 6
    assert [StageRun.objects.get(job=job).attempt for job in jobs] == [1] * 6
    assert sorted(text for texts in seen for text in texts) == [f"text {n}" for n in range(6)]


@pytest.mark.django_db(transaction=True)  # the supervisor's heartbeats commit in its thread
def test_batch_mates_past_their_deadline_or_cancelled_end_so_on_their_own_and_the_rest_complete(
    drain: Callable[..., Any], passes: Callable[..., list[list[str]]]
) -> None:
    first = embed_texts(["the first"])
    late = embed_texts(["in a hurry"], timeout_s=1)
    cancelled = embed_texts(["not needed"])
    other = embed_texts(["patient"])
    pass_ended: dict[str, Any] = {}

    def slow_pass(texts: list[str], n: int) -> None:
        if n == 0:
            services.job_cancel(job_id=cancelled.pk, reason="not needed")
            time.sleep(4)  # a slow device; the batch goes on for the others
            pass_ended["at"] = timezone.now()

    passes(slow_pass)
    with override_settings(
        OMNIVA_GPU_MAX_BATCH=64,
        OMNIVA_GPU_MAX_WAIT_MS=0,
        OMNIVA_TASK_LEASE_S=1,
        OMNIVA_CANCEL_GRACE_S=1,
    ):
        drain("gpu")

    assert fresh(first).status == fresh(other).status == JobStatus.COMPLETED
    timed_out, gone = fresh(late), fresh(cancelled)
    assert (timed_out.status, timed_out.result) == (JobStatus.TIMED_OUT, None)
    assert timed_out.error["code"] == "TIMEOUT"
    assert gone.status == JobStatus.CANCELLED
    assert gone.result is None
    # Each ended by its own deadline or cancel, while the pass still ran, not with it.
    assert timed_out.finished_at < pass_ended["at"]
    assert gone.finished_at < pass_ended["at"]


def test_a_batch_holds_at_most_the_max_batch_items_whatever_the_first_jobs_size(
    drain: Callable[..., Any], passes: Callable[..., list[list[str]]]
) -> None:
    small = embed_texts(["one text"])
    large = [embed_texts([f"large {n}.{i}" for i in range(3)]) for n in range(3)]
    seen = passes()
    with override_settings(OMNIVA_GPU_MAX_BATCH=4, OMNIVA_GPU_MAX_WAIT_MS=0):
        drain("gpu")

    # 1 + 3 texts, then each other job of 3 alone (1 + 3 * 3 = 10 in one pass before).
    assert sorted(len(texts) for texts in seen) == [3, 3, 4]
    for job in [small, *large]:
        assert fresh(job).status == JobStatus.COMPLETED
        assert StageRun.objects.get(job=job).attempt == 1  # handed back unstarted
    assert not QueueTask.objects.exists()


# --- settlement ---------------------------------------------------------------------------


def echo_many(contexts: list[StageContext]) -> list[Any]:
    # U+0000 is valid JSON, and PostgreSQL's jsonb refuses it.
    return [{"echo": "\x00" if ctx.params.get("nul") else ctx.params["text"]} for ctx in contexts]


@pytest.fixture
def echo_pipeline() -> Iterator[None]:
    from jobs.pipelines.registry import _REGISTRY, Pipeline, Stage, register

    pipeline = register(
        Pipeline(
            name="test_echo_batch",
            description="echoes its text, batched on the gpu queue",
            stages=(Stage("echo", queue="gpu", batch=echo_many),),
            params_schema={"type": "object"},
        )
    )
    yield
    _REGISTRY.pop(pipeline.name, None)


@pytest.mark.django_db(transaction=True)  # autocommit, as a worker runs
def test_one_jobs_output_the_database_refuses_fails_alone_and_the_rest_of_its_batch_completes(
    drain: Callable[..., Any], echo_pipeline: None
) -> None:
    jobs = [
        submit("test_echo_batch", {"text": "a"}),
        submit("test_echo_batch", {"nul": True}),
        submit("test_echo_batch", {"text": "c"}),
    ]
    with override_settings(OMNIVA_GPU_MAX_BATCH=64, OMNIVA_GPU_MAX_WAIT_MS=0):
        drained = drain("gpu")

    assert len(drained) == 1  # one batch
    a, refused, c = (fresh(job) for job in jobs)
    assert (a.status, a.result) == (JobStatus.COMPLETED, {"echo": "a"})
    assert (c.status, c.result) == (JobStatus.COMPLETED, {"echo": "c"})
    assert (refused.status, refused.error["code"]) == (JobStatus.FAILED, "BAD_OUTPUT")
    assert not QueueTask.objects.exists()
