"""The gpu queue end to end: a real `qcluster` for `gpu` runs image_upscale on a picture
the test draws, and reports its device for /v1/health. A gpu cluster killed (SIGKILL)
while it runs a batch across jobs: a new cluster completes every job of the batch once
(one completion of each stage), none is lost, and the killed attempts' late results are
refused."""

from __future__ import annotations

import io
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from django.db import transaction
from PIL import Image, ImageDraw

from jobs import services
from jobs.models import GpuWorkerReport, Job, JobLog, JobStatus, QueueTask, StageRun, StageStatus
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Activity
from tests.conftest import ProcessGroup, start_worker, wait_for
from tests.jobs.conftest import (  # noqa: F401 (the autouse fixtures of tests/jobs/)
    fresh_saturation_cache,
    stop_job_listener,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def draw_picture(path: Path) -> None:
    image = Image.new("RGB", (120, 120), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 100, 100), outline=(0, 0, 0), width=4)
    draw.line((20, 100, 100, 20), fill=(200, 0, 0), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "PNG")


def test_a_gpu_worker_process_upscales_a_picture_and_reports_its_device(
    processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    draw_picture(media / "drawn" / "square.png")
    worker = start_worker(
        processes,
        test_database_url,
        tmp_path / "qcluster.log",
        Q_CLUSTER_NAME="gpu",
        OMNIVA_MEDIA_ROOT=str(media),
        OMNIVA_DEVICE="cpu",
    )

    def log() -> str:
        return (tmp_path / "qcluster.log").read_text(errors="replace")[-3000:]

    job, _ = services.job_submit(
        pipeline="image_upscale", params={"input_url": "drawn/square.png", "scale": 2}
    )

    def finished() -> bool:
        assert worker.poll() is None, log()
        return Job.objects.get(pk=job.pk).is_finished

    wait_for(finished, timeout=180, interval=0.2, what=f"the job to finish\n{log()}")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, (job.error, log())
    assert job.result["classification"]["category"] == "square"
    output = media / job.result["output_url"].removeprefix("/media/")
    assert Image.open(io.BytesIO(output.read_bytes())).size == (240, 240)
    assert {run.worker for run in job.stages.all()} != {""}

    # The worker reports its device once its models are warm.
    wait_for(GpuWorkerReport.objects.exists, timeout=120, interval=0.2, what=f"a report\n{log()}")
    report = GpuWorkerReport.objects.get()
    assert report.data["device"] == "cpu"
    assert report.data["models"] == ["all-MiniLM-L6-v2"]


# Jobs of one batch, each of a few short texts: the batch is about who runs them, not
# about the model's speed.
BATCH_JOBS = 10
# The killed worker's task lease: its attempts come back this long after it started them.
KILLED_LEASE_S = 5
# How long the killed worker gathers a batch before its forward pass (more texts never
# come): every attempt of the batch is started, under that worker, for this long. The
# test kills it then, so the kill lands in the batch whatever the machine's speed (the
# database holds the same as during the forward pass: nothing is written between the
# batch's starts and its settlement).
KILLED_GATHER_MS = 4000


def test_a_gpu_worker_killed_in_the_middle_of_a_batch_loses_no_job_and_each_completes_once(
    processes: ProcessGroup,
    test_database_url: str,
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    logs = [tmp_path / "gpu-killed.log", tmp_path / "gpu-new.log"]

    def log() -> str:
        return "\n".join(path.read_text(errors="replace")[-3000:] for path in logs if path.exists())

    cpu = {"Q_CLUSTER_NAME": "gpu", "OMNIVA_DEVICE": "cpu"}
    killed = start_worker(
        processes,
        test_database_url,
        logs[0],
        **cpu,
        OMNIVA_TASK_LEASE_S=str(KILLED_LEASE_S),
        OMNIVA_GPU_MAX_WAIT_MS=str(KILLED_GATHER_MS),
        OMNIVA_GPU_MAX_BATCH="1000",
    )
    # Its worker process is up before any work comes (its model need not be loaded:
    # the batch is killed before its forward pass, so this test pays for one load).
    wait_for(lambda: "ready for work" in log(), timeout=60, interval=0.1, what=f"a worker\n{log()}")

    # One commit for every job: they are ready together, and the worker gathers those
    # its cluster's pusher did not take ahead into one batch.
    with transaction.atomic():
        jobs = [
            services.job_submit(
                pipeline="embed_texts", params={"texts": [f"job {n} says hello", f"job {n} ends"]}
            )[0]
            for n in range(BATCH_JOBS)
        ]
    run_ids = list(StageRun.objects.filter(job__in=jobs).values_list("pk", flat=True))

    def batch_gathered() -> bool:
        assert killed.poll() is None, log()
        # Every task was claimed (the pusher takes at most a few ahead; the batch's
        # gathering claimed and started the others in one commit).
        claimed = QueueTask.objects.filter(stage_run_id__in=run_ids, deliveries__gte=1).count()
        running = StageRun.objects.filter(pk__in=run_ids, status=StageStatus.RUNNING).count()
        return claimed == BATCH_JOBS and running > 1

    wait_for(batch_gathered, timeout=60, interval=0.05, what=f"the batch to start\n{log()}")
    # The cluster's sentinel: the qcluster's child, parent of its pusher and workers.
    sentinels = {child.pid for child in psutil.Process(killed.pid).children()}
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=10)

    at_kill = {run.pk: run for run in StageRun.objects.filter(pk__in=run_ids)}
    batch = [run for run in at_kill.values() if run.status == StageStatus.RUNNING]
    taken_ahead = [run for run in at_kill.values() if run.status == StageStatus.QUEUED]
    killed_workers = {run.worker for run in batch}

    new = start_worker(processes, test_database_url, logs[1], **cpu)

    def all_finished() -> bool:
        assert new.poll() is None, log()
        return not Job.objects.filter(pk__in=[job.pk for job in jobs], finished_at__isnull=True)

    wait_for(all_finished, timeout=180, interval=0.2, what=f"every job to finish\n{log()}")

    # The killed attempts' results, arriving late (a worker that was only paused), hold
    # tokens that no longer match: refused, nothing changes.
    late_refused = 0
    for run in batch:
        try:
            services.stage_complete(
                stage_run_id=run.pk, token=str(run.lease_token), output={"vectors": "late"}
            )
        except OmnivaError as error:
            late_refused += error.code == ErrorCode.STAGE_LEASE_LOST

    finished = {job.pk: job for job in Job.objects.filter(pk__in=[job.pk for job in jobs])}
    after = {run.pk: run for run in StageRun.objects.filter(pk__in=run_ids)}
    stage_completions = {
        run_id: Activity.objects.filter(
            kind="stage:update", data__id=run_id, data__status=StageStatus.COMPLETED
        ).count()
        for run_id in run_ids
    }
    job_completions = {
        job_id: Activity.objects.filter(
            job_id=job_id, kind="job:update", data__status=JobStatus.COMPLETED
        ).count()
        for job_id in finished
    }
    completed = [job for job in finished.values() if job.status == JobStatus.COMPLETED]
    fault_report(
        submitted=BATCH_JOBS,
        in_batch_at_kill=len(batch),
        taken_ahead_at_kill=len(taken_ahead),
        attempts_retried=sum(after[run.pk].attempt == 2 for run in batch),
        late_completions_refused=late_refused,
        completed=len(completed),
        jobs_lost=BATCH_JOBS - len(completed),
        duplicated_effects=sum(count - 1 for count in stage_completions.values() if count > 1)
        + sum(count - 1 for count in job_completions.values() if count > 1),
    )
    # Tasks the pusher delivered started in the broker's claim, which names the cluster
    # (its sentinel, the parent of the pusher and the workers); the attempts the worker
    # gathered name that worker process.
    named = {int(name.rsplit(":", 1)[1]) for name in killed_workers}
    assert len(named - sentinels) == 1, "one worker process ran the batch"
    assert all(run.attempt == 1 for run in batch)
    assert len(batch) + len(taken_ahead) == BATCH_JOBS, "nothing ended before the kill"
    assert len(completed) == BATCH_JOBS, [(job.status, job.error) for job in finished.values()]
    assert late_refused == len(batch)
    for run in batch:
        again = after[run.pk]
        assert again.attempt == 2, again
        assert again.worker not in killed_workers, again
        lost = JobLog.objects.filter(job_id=run.job_id, message__contains="stopped responding")
        assert lost.exists()
    for run in taken_ahead:
        assert after[run.pk].attempt == 1  # never started: delivered again, not retried
    for job in completed:
        assert job.result["dim"] == 384
        assert len(job.result["vectors"]) == len(job.params["texts"])
        assert after[job.stages.get().pk].output == job.result
    assert stage_completions == dict.fromkeys(run_ids, 1), "each stage's output is written once"
    assert job_completions == dict.fromkeys(finished, 1), "each job completes once"
    assert not QueueTask.objects.filter(stage_run_id__in=run_ids).exists(), "all acknowledged"
