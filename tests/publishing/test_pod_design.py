"""`pod_design` (seed 001) end to end: prompt, designs from an `image_generation`
engine, mockups composited with Pillow, publication to the project's destinations.

The default-queue stages run in-process (`drain`); the engine stages are claimed and
completed through the engines' services by the registered `image_generation` handler
(procedural, as an engine without ComfyUI runs it), and once by a real
`manage.py run_engine` process against daphne.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings
from PIL import Image, ImageChops, ImageStat

from engines import services as engines
from engines.sdk.builtin import register_builtin_handlers
from engines.sdk.client import EngineClient
from engines.sdk.handlers import get_handler
from jobs import services as job_services
from jobs.models import Job, JobStatus
from omniva import services as omniva_services
from omniva.media import media_name
from omniva.models import Project, Scope
from publishing.models import Destination, Publication, PublicationStatus
from publishing.pipelines.pod import BACKGROUND, GARMENT_COLORS, MOCKUP_SIZE
from tests.conftest import ProcessGroup, free_port, start_daphne, wait_for

pytestmark = pytest.mark.django_db

RESULT_KEYS = {"success", "generatedImages", "products", "mockups", "errors", "totalTime"}


@pytest.fixture(autouse=True)
def roots(tmp_path: Path) -> Iterator[Path]:
    """Artifacts and directory destinations under the test's own folder."""
    with override_settings(MEDIA_ROOT=tmp_path / "media", OMNIVA_PUBLISH_ROOT=tmp_path / "publish"):
        yield tmp_path


@pytest.fixture
def project() -> Project:
    return Project.objects.create(name="merch")


def directory(project: Project, name: str = "shop", path: str = "pod") -> Destination:
    return Destination.objects.create(
        project=project, name=name, kind="directory", config={"path": path}
    )


def submit(params: dict[str, Any], **kwargs: Any) -> Job:
    job, _ = job_services.job_submit(pipeline="pod_design", params=params, **kwargs)
    return job


def run_engine_events(handler: Any = None) -> int:
    """One in-process image_generation engine: claim every waiting event, run the
    registered handler (or `handler`), report completion. The number of events run."""
    register_builtin_handlers()  # as the engine process does when it starts
    handler = handler or get_handler("image_generation")
    engine = engines.engine_register(engine_type="image_generation")
    ran = 0
    while events := engines.events_claim(
        engine_type="image_generation", engine_id=engine.pk, batch_size=10
    ):
        for event in events:
            engines.event_update_status(
                event_id=event.pk,
                status="completed",
                result=handler(event.data, lambda percent: None),
                lease_token=event.lease_token,
            )
            ran += 1
    engines.engine_deregister(engine_id=engine.pk)
    return ran


def run_job(job: Job, drain: Callable[..., Any], handler: Any = None) -> Job:
    """prompt, the engine stages, mockups and publish."""
    drain()
    run_engine_events(handler)
    drain()
    job.refresh_from_db()
    return job


def stored_png(url: str) -> Image.Image:
    path = Path(settings.MEDIA_ROOT) / media_name(url)
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG"
    return image.convert("RGB")


def test_a_batch_of_three_makes_three_designs_with_mockups_in_seed_001s_shape(
    drain: Callable[..., Any], project: Project
) -> None:
    directory(project)  # there, but autoPublish is off
    job = submit(
        {
            "prompt": "A majestic mountain landscape",
            "productTypes": ["tshirt", "hoodie"],
            "count": 3,
            "autoPublish": False,
            "width": 256,
            "height": 256,
        },
        project=project,
    )
    job = run_job(job, drain)

    assert job.status == JobStatus.COMPLETED, job.error
    result = job.result
    assert set(result) == RESULT_KEYS
    assert (result["success"], result["products"], result["errors"]) == (True, [], [])
    assert isinstance(result["totalTime"], int)
    assert result["totalTime"] >= 0
    images = result["generatedImages"]
    assert len(images) == 3
    assert len({image["id"] for image in images}) == 3
    assert len({image["seed"] for image in images}) == 3  # three pictures, not one thrice
    assert {image["prompt"] for image in images} == {"A majestic mountain landscape"}
    designs = [stored_png(image["url"]) for image in images]
    assert all(design.size == (256, 256) for design in designs)
    assert designs[0].tobytes() != designs[1].tobytes()
    assert sorted((m["design"], m["type"]) for m in result["mockups"]) == [
        (0, "hoodie"), (0, "tshirt"), (1, "hoodie"), (1, "tshirt"), (2, "hoodie"), (2, "tshirt"),
    ]  # fmt: skip
    assert all(m["url"].startswith(f"/media/jobs/{job.pk}/") for m in result["mockups"])
    assert not Publication.objects.exists()


def test_a_mockup_is_the_garment_with_the_design_composited_on_its_print_area(
    drain: Callable[..., Any],
) -> None:
    job = submit({"prompt": "neon fox", "productTypes": ["tshirt", "hoodie"], "autoPublish": False})
    job = run_job(job, drain)
    assert job.status == JobStatus.COMPLETED, job.error
    design = stored_png(job.result["generatedImages"][0]["url"])
    boxes = {
        output["type"]: output["print_box"]
        for output in job.stages.get(name="mockups").output["mockups"]
    }

    for item in job.result["mockups"]:
        picture = stored_png(item["url"])
        assert picture.size == (MOCKUP_SIZE, MOCKUP_SIZE)
        x0, y0, x1, y1 = boxes[item["type"]]
        printed = picture.crop((x0, y0, x1, y1))
        expected = design.resize(printed.size, Image.Resampling.LANCZOS)
        difference = ImageStat.Stat(ImageChops.difference(printed, expected)).mean
        assert max(difference) < 1.0, (item["type"], difference)
        # Around the print: the garment's own colour, and the backdrop beyond it.
        assert picture.getpixel(((x0 + x1) // 2, y1 + 40)) == GARMENT_COLORS[item["type"]]
        assert picture.getpixel((5, MOCKUP_SIZE - 5)) == BACKGROUND


def test_theme_style_and_niche_build_a_distinct_prompt_for_each_design(
    drain: Callable[..., Any],
) -> None:
    job = submit(
        {
            "theme": "mountains",
            "style": "minimalist",
            "niche": "hiking",
            "productTypes": ["tshirt"],
            "count": 2,
            "autoPublish": False,
        }
    )
    job = run_job(job, drain)
    assert job.status == JobStatus.COMPLETED, job.error
    prompts = [image["prompt"] for image in job.result["generatedImages"]]
    assert len(set(prompts)) == 2
    for prompt in prompts:
        assert "minimalist mountains" in prompt
        assert "hiking" in prompt


def test_auto_publish_sends_each_product_once_to_a_directory_destination(
    drain: Callable[..., Any], project: Project, roots: Path
) -> None:
    directory(project)
    job = submit(
        {
            "prompt": "Retro sunset over the sea",
            "theme": "ocean",
            "productTypes": ["tshirt", "hoodie"],
            "autoPublish": True,
            "prices": {"hoodie": 49.5},
        },
        project=project,
    )
    job = run_job(job, drain)

    assert job.status == JobStatus.COMPLETED, job.error
    products = job.result["products"]
    assert sorted(p["type"] for p in products) == ["hoodie", "tshirt"]
    assert {p["platform"] for p in products} == {"directory"}
    publications = Publication.objects.all()
    assert len(publications) == 2
    assert {p.status for p in publications} == {PublicationStatus.PUBLISHED}
    assert {p["productId"] for p in products} == {p.external_id for p in publications}
    folder = roots / "publish" / "pod"
    assert len(list(folder.glob("*.png"))) == 2
    described = {
        item["product_type"]: item
        for item in (json.loads(path.read_text()) for path in folder.glob("*.json"))
    }
    assert described["hoodie"]["price"] == 49.5
    assert described["tshirt"]["price"] == 24.99
    assert described["tshirt"]["title"].startswith("Retro sunset over the sea")
    assert described["tshirt"]["tags"] == ["ocean", "tshirt"]
    assert described["tshirt"]["description"] == "Retro sunset over the sea"


def test_a_destination_gets_only_the_product_types_it_takes(
    drain: Callable[..., Any], project: Project
) -> None:
    hoodies = directory(project, "hoodies", "hoodies")
    hoodies.config["product_types"] = ["hoodie"]
    hoodies.save()
    everything = directory(project, "everything", "all")
    job = submit({"prompt": "owl", "productTypes": ["tshirt", "hoodie"]}, project=project)
    job = run_job(job, drain)
    assert job.status == JobStatus.COMPLETED, job.error
    sent = sorted((p["destination"], p["type"]) for p in job.result["products"])
    assert sent == sorted(
        [
            (str(hoodies.pk), "hoodie"),
            (str(everything.pk), "hoodie"),
            (str(everything.pk), "tshirt"),
        ]
    )


def test_a_failed_publication_retries_the_stage_and_the_retry_sends_only_what_failed(
    drain: Callable[..., Any], due: Callable[[Job], None], project: Project, roots: Path
) -> None:
    good = directory(project, "a-good", "good")
    directory(project, "b-blocked", "blocked")
    (roots / "publish").mkdir(parents=True)
    (roots / "publish" / "blocked").write_text("a file where the folder should be")
    job = submit({"prompt": "owl", "productTypes": ["tshirt"]}, project=project)

    job = run_job(job, drain)
    assert job.status == JobStatus.RETRYING  # UPLOAD_FAILED, retried with backoff
    assert job.stages.get(name="publish").error["code"] == "UPLOAD_FAILED"
    assert Publication.objects.get(destination=good).status == PublicationStatus.PUBLISHED

    (roots / "publish" / "blocked").unlink()
    due(job)
    drain()
    job.refresh_from_db()

    assert job.status == JobStatus.COMPLETED, job.error
    assert len(job.result["products"]) == 2
    assert {p.status for p in Publication.objects.all()} == {PublicationStatus.PUBLISHED}
    # The publication that made it the first time was not sent again.
    assert Publication.objects.get(destination=good).attempts == 1
    assert Publication.objects.count() == 2


def test_without_a_project_nothing_is_published_and_errors_say_why(
    drain: Callable[..., Any],
) -> None:
    job = run_job(submit({"prompt": "cat", "productTypes": ["hoodie"]}), drain)
    assert job.status == JobStatus.COMPLETED, job.error
    assert job.result["success"] is False
    assert job.result["products"] == []
    [error] = job.result["errors"]
    assert "no project" in error
    assert len(job.result["generatedImages"]) == 1


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"prompt": "x"}, "params"),  # productTypes is required
        ({"prompt": "x", "productTypes": ["mug"]}, "params.productTypes.0"),
        ({"prompt": "x", "productTypes": []}, "params.productTypes"),
        ({"prompt": "x", "productTypes": ["tshirt"], "count": 11}, "params.count"),
        ({"prompt": "x", "productTypes": ["tshirt"], "count": 0}, "params.count"),
        ({"productTypes": ["tshirt"]}, "params"),  # nothing to draw
        ({"prompt": "  ", "productTypes": ["tshirt"]}, "params.prompt"),
        ({"prompt": "x", "productTypes": ["tshirt"], "width": 300}, "params.width"),
    ],
)
def test_bad_params_are_refused_at_submit_with_validation_error(
    api: Any, params: dict[str, Any], field: str
) -> None:
    answer = api.post(
        "/v1/jobs",
        data=json.dumps({"pipeline": "pod_design", "params": params}),
        content_type="application/json",
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert field in error["details"]
    assert not Job.objects.exists()


def test_an_engine_image_that_is_not_a_png_fails_the_job_with_invalid_image(
    drain: Callable[..., Any],
) -> None:
    def not_a_png(data: dict[str, Any], report_progress: Any) -> dict[str, Any]:
        return {"image_png_base64": base64.b64encode(b"GIF89a not really").decode()}

    job = run_job(
        submit({"prompt": "x", "productTypes": ["tshirt"], "autoPublish": False}),
        drain,
        handler=not_a_png,
    )
    assert job.status == JobStatus.FAILED
    assert (job.error["code"], job.error["stage"]) == ("INVALID_IMAGE", "mockups")
    assert job.attempts == 1  # retrying cannot change the bytes


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_run_engine_process_draws_the_designs_of_a_pod_design_job(
    drain: Callable[..., Any], processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    server = start_daphne(processes, test_database_url, free_port(), tmp_path / "daphne.log")
    _, secret = omniva_services.api_key_create(
        name="pod-engine", scopes=[Scope.ENGINES, Scope.JOBS_WRITE, Scope.JOBS_READ]
    )
    engine_log = tmp_path / "engine.log"
    engine = processes.manage(
        "run_engine",
        "--type", "image_generation",
        "--url", server.url,
        "--heartbeat-s", "1",
        "--wait-s", "5",
        env={"OMNIVA_ENGINE_KEY": secret},
        log=engine_log,
    )  # fmt: skip
    job = EngineClient(server.url, secret).request(
        "POST",
        "/jobs",
        {
            "pipeline": "pod_design",
            "params": {
                "prompt": "A lighthouse in a storm",
                "productTypes": ["tshirt"],
                "count": 2,
                "autoPublish": False,
                "width": 256,
                "height": 256,
            },
        },
    )

    def finished() -> Job | None:
        assert engine.poll() is None, engine_log.read_text()
        drain()  # our default-queue stages; the engine process runs the others
        row = Job.objects.get(pk=job["id"])
        return row if row.status in (JobStatus.COMPLETED, JobStatus.FAILED) else None

    done = wait_for(finished, timeout=60, interval=0.1, what="the pod_design job to finish")

    assert done.status == JobStatus.COMPLETED, (done.error, engine_log.read_text()[-3000:])
    images = done.result["generatedImages"]
    assert [image["generator"] for image in images] == ["procedural", "procedural"]
    assert all(stored_png(image["url"]).size == (256, 256) for image in images)
    workers = set(done.stages.filter(name__startswith="generate_").values_list("worker", flat=True))
    assert len(workers) == 1
    assert workers != {""}
