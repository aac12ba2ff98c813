"""The gpu queue end to end: a real `qcluster` for `gpu` runs image_upscale on a picture
the test draws, and reports its device for /v1/health."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from jobs import services
from jobs.models import GpuWorkerReport, Job, JobStatus
from tests.conftest import ProcessGroup, wait_for

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
    worker = processes.manage(
        "qcluster",
        env={
            "DATABASE_URL": test_database_url,
            "Q_CLUSTER_NAME": "gpu",
            "OMNIVA_MEDIA_ROOT": str(media),
            "OMNIVA_DEVICE": "cpu",
        },
        log=tmp_path / "qcluster.log",
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
