"""The gpu queue's stages on the CPU: the embedding model, batches across jobs, and
image_upscale end to end through the in-process worker (`drain`)."""

from __future__ import annotations

import http.server
import io
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from PIL import Image, ImageDraw

from jobs import selectors, services
from jobs.models import GpuWorkerReport, Job, JobStatus, QueueTask
from jobs.pipelines.context import StageContext
from jobs.pipelines.gpu import EMBED_TEXTS, embed_many
from jobs.pipelines.lib.inference import EMBED_DIM, models
from omniva.models import Activity
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db

# A batchable stage's single run is its batch of one (jobs.pipelines.registry.Stage).
embed_one = EMBED_TEXTS.stages[0].run


@pytest.fixture(autouse=True)
def fresh_batch_stats() -> None:
    """The model stays loaded across tests (as in a worker); its statistics do not."""
    models.stats.clear()


def context(texts: Any, n: int = 0) -> StageContext:
    return StageContext(
        job_id=f"job-{n}",
        stage="embed",
        stage_run_id=n,
        attempt=1,
        token="t",
        params={"texts": texts},
        inputs={},
        reporter=services.stage_report,
        pipeline="embed_texts",
    )


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def submit(pipeline: str, params: dict[str, Any]) -> Job:
    job, _ = services.job_submit(pipeline=pipeline, params=params)
    return job


def test_the_model_loads_offline_from_the_installed_package_and_gives_unit_vectors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any attempt to reach a hub would fail: there is no network and HF is offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    [vector] = embed_one(context(["The cat sits on the mat."]))["vectors"]
    assert len(vector) == EMBED_DIM
    assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    assert models.loaded() == ["all-MiniLM-L6-v2"]


def test_similar_sentences_score_closer_than_unrelated_ones() -> None:
    cat, kitten, tax = embed_one(
        context(
            [
                "A cat is sleeping on the sofa.",
                "A kitten naps on the couch.",
                "Quarterly tax filings are due at the end of the month.",
            ]
        )
    )["vectors"]
    assert cosine(cat, kitten) > cosine(cat, tax) + 0.3


def test_a_batch_across_jobs_equals_each_job_run_alone() -> None:
    jobs = [["short one"], ["a somewhat longer sentence about GPUs", "and another"], ["x"]]
    batched = embed_many([context(texts, n) for n, texts in enumerate(jobs)])
    for texts, together in zip(jobs, batched, strict=True):
        alone = embed_one(context(texts))
        for u, v in zip(together["vectors"], alone["vectors"], strict=True):
            assert max(abs(x - y) for x, y in zip(u, v, strict=True)) < 1e-5


def test_bad_items_fail_alone_and_the_rest_of_the_batch_completes() -> None:
    good, empty, wrong = embed_many([context(["fine"], 0), context([], 1), context(["ok", 3], 2)])
    assert len(good["vectors"]) == 1
    assert (empty.code, empty.retryable) == ("EMPTY_INPUT", False)
    assert (wrong.code, wrong.retryable) == ("INVALID_INPUT", False)


def test_ready_embed_jobs_run_in_one_forward_pass_and_each_gets_its_own_vectors(
    drain: Callable[..., Any],
) -> None:
    texts = [f"sentence number {i}" for i in range(6)]
    jobs = [submit("embed_texts", {"texts": [text]}) for text in texts]
    with override_settings(OMNIVA_GPU_MAX_BATCH=64, OMNIVA_GPU_MAX_WAIT_MS=0):
        drained = drain("gpu")
    # One delivery ran; it gathered the other five from the queue table.
    assert len(drained) == 1
    assert models.stats["embed"].forward_passes == 1
    assert models.stats["embed"].last_size == 6
    for job, text in zip(jobs, texts, strict=True):
        job.refresh_from_db()
        assert job.status == JobStatus.COMPLETED
        alone = embed_one(context([text]))["vectors"][0]
        assert cosine(job.result["vectors"][0], alone) > 0.9999
        assert (job.result["model"], job.result["dim"]) == ("all-MiniLM-L6-v2", EMBED_DIM)
        # Started and completed in one statement each for the batch, with the live
        # stream's rows of each job as a single start and completion write them.
        rows = Activity.objects.filter(job_id=job.pk).order_by("id")
        assert [(r.kind, r.data["status"]) for r in rows] == [
            ("job:update", "pending"),
            ("stage:update", "queued"),
            ("job:update", "running"),
            ("stage:update", "running"),
            ("stage:update", "completed"),
            ("job:update", "completed"),
        ]


def test_the_batch_stops_at_the_max_batch_and_the_rest_run_after(
    drain: Callable[..., Any],
) -> None:
    jobs = [submit("embed_texts", {"texts": [f"t{i}", f"u{i}"]}) for i in range(5)]
    with override_settings(OMNIVA_GPU_MAX_BATCH=4, OMNIVA_GPU_MAX_WAIT_MS=0):
        drained = drain("gpu")
    # 2 texts a job, 4 at most a batch: 2 jobs per delivery, 3 deliveries in all.
    assert len(drained) == 3
    assert models.stats["embed"].largest <= 4
    assert all(Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED for job in jobs)


def test_a_refused_completion_leaves_the_rest_of_the_batch_completed(
    drain: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uuid

    from jobs.models import StageRun

    jobs = [submit("embed_texts", {"texts": [f"text {i}"]}) for i in range(3)]
    victim = jobs[1]
    embed = models.embed

    def embed_while_another_attempt_takes_over(texts: list[str], **kwargs: Any) -> Any:
        # The victim's lease is lost mid-batch: its completion must be refused alone.
        StageRun.objects.filter(job=victim).update(lease_token=uuid.uuid4())
        return embed(texts, **kwargs)

    monkeypatch.setattr(models, "embed", embed_while_another_attempt_takes_over)
    with override_settings(OMNIVA_GPU_MAX_BATCH=64, OMNIVA_GPU_MAX_WAIT_MS=0):
        drain("gpu")
    statuses = [Job.objects.get(pk=job.pk).status for job in jobs]
    assert statuses == [JobStatus.COMPLETED, JobStatus.RUNNING, JobStatus.COMPLETED]
    assert Job.objects.get(pk=victim.pk).result is None


@pytest.mark.django_db(transaction=True)  # the supervisor's heartbeats commit in its thread
def test_a_forward_pass_longer_than_the_lease_keeps_every_attempt_of_the_batch_leased(
    drain: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.models import StageRun

    jobs = [submit("embed_texts", {"texts": [f"slow {i}"]}) for i in range(3)]
    embed = models.embed
    leases: dict[int, Any] = {}
    hidden: dict[int, Any] = {}  # the queue rows' visible_at, per stage run

    def queue_rows() -> dict[int, Any]:
        runs = StageRun.objects.filter(job__in=jobs).values("pk")
        rows = QueueTask.objects.filter(stage_run_id__in=runs)
        return dict(rows.values_list("stage_run_id", "visible_at"))

    def renewed() -> bool:
        now = {run.pk: run.lease_expires_at for run in StageRun.objects.filter(job__in=jobs)}
        rows = queue_rows()
        return all(now[pk] and now[pk] > first for pk, first in leases.items()) and all(
            rows[pk] > first for pk, first in hidden.items()
        )

    def slow_forward_pass(texts: list[str], **kwargs: Any) -> Any:
        # A slow device: the pass outlasts the first leases of all three attempts and of
        # their queue rows (another worker would take those again).
        leases.update(StageRun.objects.filter(job__in=jobs).values_list("pk", "lease_expires_at"))
        hidden.update(queue_rows())
        wait_for(renewed, timeout=30, what="every attempt's lease to be extended")
        return embed(texts, **kwargs)

    monkeypatch.setattr(models, "embed", slow_forward_pass)
    with override_settings(
        OMNIVA_GPU_MAX_BATCH=64, OMNIVA_GPU_MAX_WAIT_MS=0, OMNIVA_TASK_LEASE_S=1
    ):
        drain("gpu")

    assert len(leases) == len(hidden) == 3
    runs = StageRun.objects.filter(job__in=jobs)
    assert [run.attempt for run in runs] == [1, 1, 1]
    assert all(Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED for job in jobs)


def test_an_empty_text_list_is_refused_at_submission() -> None:
    from omniva.errors import OmnivaError

    with pytest.raises(OmnivaError) as refused:
        submit("embed_texts", {"texts": []})
    assert refused.value.code == "VALIDATION_ERROR"


# --- image_upscale ----------------------------------------------------------------------


def picture(width: int = 96, height: int = 64) -> bytes:
    image = Image.new("RGB", (width, height), (30, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 50, 50), fill=(240, 200, 20))
    draw.rectangle((60, 20, 90, 60), fill=(200, 30, 30))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def media(tmp_path: Path) -> Iterator[Path]:
    with override_settings(MEDIA_ROOT=tmp_path):
        yield tmp_path


class PictureServer(http.server.ThreadingHTTPServer):
    def __init__(self, body: bytes, content_type: str = "image/png") -> None:
        self.body = body
        self.content_type = content_type
        self.requests = 0
        self.received: bytes | None = None
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: PictureServer

    def do_GET(self) -> None:
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def do_PUT(self) -> None:
        self.server.requests += 1
        self.server.received = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., PictureServer]]:
    servers: list[PictureServer] = []

    def start(body: bytes, content_type: str = "image/png") -> PictureServer:
        server = PictureServer(body, content_type)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_media_file_is_classified_upscaled_and_served(
    drain: Callable[..., Any], media: Path, client: Any
) -> None:
    (media / "in").mkdir()
    (media / "in" / "pic.png").write_bytes(picture(96, 64))
    job = submit("image_upscale", {"input_url": "in/pic.png", "scale": 2})
    drain("gpu")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    result = job.result
    assert result["input_url"] == "in/pic.png"
    assert result["classification"]["category"] == "landscape"
    assert (result["classification"]["width"], result["classification"]["height"]) == (96, 64)
    assert result["upscale"]["method"] == "bicubic + unsharp mask (torch)"
    assert result["output_url"] == f"/media/jobs/{job.pk}/upscaled_x2.png"
    served = client.get(result["output_url"])
    assert served.status_code == 200
    upscaled = Image.open(io.BytesIO(b"".join(served.streaming_content)))
    assert upscaled.size == (192, 128)


def test_an_http_input_is_fetched_and_the_output_put_to_the_output_url(
    drain: Callable[..., Any], media: Path, serve: Callable[..., PictureServer]
) -> None:
    source = serve(picture(40, 80))
    sink = serve(b"")
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        job = submit(
            "image_upscale",
            {"input_url": f"{source.url}/a.png", "output_url": f"{sink.url}/out.png", "scale": 4},
        )
        drain("gpu")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    assert job.result["output_url"] == f"{sink.url}/out.png"
    assert job.result["classification"]["category"] == "portrait"
    assert sink.received is not None
    assert Image.open(io.BytesIO(sink.received)).size == (160, 320)


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b"<html>not a picture</html>", "text/html", "INVALID_IMAGE"),
        (picture(96, 64)[:60], "image/png", "INVALID_IMAGE"),
    ],
)
def test_bad_images_fail_the_job_without_a_retry(
    drain: Callable[..., Any],
    media: Path,
    serve: Callable[..., PictureServer],
    body: bytes,
    content_type: str,
    code: str,
) -> None:
    source = serve(body, content_type)
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        job = submit("image_upscale", {"input_url": f"{source.url}/x"})
        drain("gpu")
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == code
    assert source.requests == 1  # tried once: bad input is not retried


def test_an_unreachable_url_fails_the_job_without_a_retry(
    drain: Callable[..., Any], media: Path
) -> None:
    from tests.conftest import free_port

    closed = free_port()  # nothing listens there
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        job = submit("image_upscale", {"input_url": f"http://127.0.0.1:{closed}/a.png"})
        drain("gpu")
    job.refresh_from_db()
    assert (job.status, job.error["code"], job.attempts) == (JobStatus.FAILED, "FETCH_FAILED", 1)


def test_a_too_large_image_fails_with_image_too_large(
    drain: Callable[..., Any], media: Path
) -> None:
    (media / "big.png").write_bytes(picture(200, 100))
    with override_settings(OMNIVA_IMAGE_MAX_PIXELS=10_000):
        job = submit("image_upscale", {"input_url": "big.png"})
        drain("gpu")
    job.refresh_from_db()
    assert (job.status, job.error["code"]) == (JobStatus.FAILED, "IMAGE_TOO_LARGE")


def test_a_private_url_is_refused_and_never_requested(
    drain: Callable[..., Any], media: Path, serve: Callable[..., PictureServer]
) -> None:
    source = serve(picture())
    job = submit("image_upscale", {"input_url": f"{source.url}/a.png"})
    drain("gpu")
    job.refresh_from_db()
    assert (job.status, job.error["code"]) == (JobStatus.FAILED, "URL_NOT_ALLOWED")
    assert source.requests == 0


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "file:///etc/passwd"])
def test_an_input_outside_the_media_root_is_refused(
    drain: Callable[..., Any], media: Path, name: str
) -> None:
    job = submit("image_upscale", {"input_url": name})
    drain("gpu")
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error["code"] in {"PATH_NOT_ALLOWED", "URL_NOT_ALLOWED"}


# --- status -----------------------------------------------------------------------------


def test_a_gpu_workers_report_is_in_health_and_info(client: Any) -> None:
    from jobs.gpu_worker import report_status

    report_status("gpu-host:1")
    gpu = client.get("/v1/health").json()["data"]["checks"]["gpu"]
    assert gpu["status"] == "ok"
    assert gpu["worker"] == "gpu-host:1"
    assert gpu["device"] in {"cpu", "cuda", "cuda:0"}
    assert "memory_total_mb" in gpu
    assert "batches" in gpu
    info = client.get("/v1/info").json()["data"]
    assert [w["worker"] for w in info["config"]["gpu"]["workers"]] == ["gpu-host:1"]


def test_gpu_work_waiting_with_no_worker_reporting_degrades_health() -> None:
    assert selectors.check_gpu()["status"] == "ok"  # nothing waits
    submit("embed_texts", {"texts": ["waiting"]})
    assert not GpuWorkerReport.objects.exists()
    check = selectors.check_gpu()
    assert check["status"] == "degraded"
    assert "no GPU worker reporting" in check["detail"]
