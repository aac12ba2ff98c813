"""Seed 004's task types: the `report` pipeline in each execution mode (DAG shapes,
statistics, topic clusters, Markdown and HTML artifacts served from /media, escaping),
`data_analysis`, and `api_call` against a local fake API (answers with their headers
and bodies, 4xx results, DELETE and HEAD, retries inside the stage and by the engine,
the SSRF guard, cancellation)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings
from PIL import Image

from jobs import services
from jobs.models import Job, JobLog, JobStatus
from jobs.pipelines import registry as pipelines
from tests.conftest import free_port

pytestmark = pytest.mark.django_db

CAT_TEXTS = [
    ("cat-1", "My cat sleeps on the warm windowsill all afternoon."),
    ("bank-1", "The central bank raised interest rates by half a percent."),
    ("cat-2", "The kitten chased a ball of yarn across the living room."),
    ("bank-2", "Quarterly earnings beat analyst expectations and the stock rallied."),
    ("cat-3", "Our cat purrs loudly whenever someone strokes her soft fur."),
    ("bank-3", "Inflation data pushed government bond yields to a ten-year high."),
]
SALES = {
    "year": 2024,
    "sales": [
        {"region": "north", "amount": 10},
        {"region": "south", "amount": 20},
        {"region": "east", "amount": 30},
        {"amount": 40, "returned": True},
    ],
}


def red_png(width: int = 40, height: int = 20) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (255, 0, 0)).save(out, "PNG")
    return out.getvalue()


def mixed_inputs() -> list[dict[str, Any]]:
    """Two texts, a JSON document (as JSON text) and an inline image."""
    return [
        {"input_id": "notes", "type": "text", "data": "Cats purr. Cats sleep all day!"},
        {"input_id": "sales", "type": "json", "data": json.dumps(SALES)},
        {"input_id": "memo", "type": "text", "data": "Sleep well"},
        {"input_id": "logo", "type": "image", "data": base64.b64encode(red_png()).decode()},
    ]


def submit(pipeline: str, params: dict[str, Any]) -> Job:
    job, _ = services.job_submit(pipeline=pipeline, params=params)
    return job


def run_to_end(drain: Callable[..., Any], job: Job) -> Job:
    """Drain the default and gpu queues until the job ends or nothing is ready."""
    while True:
        ran = len(drain("default")) + len(drain("gpu"))
        job.refresh_from_db()
        if job.is_finished or ran == 0:
            return job


@pytest.fixture
def media(tmp_path: Path) -> Iterator[Path]:
    with override_settings(MEDIA_ROOT=tmp_path):
        yield tmp_path


def served(client: Any, url: str) -> tuple[Any, str]:
    response = client.get(url)
    assert response.status_code == 200, url
    return response, b"".join(response.streaming_content).decode()


# --- report: DAG shapes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        (
            "sequential",
            [
                ("data_ingest", ()),
                ("embed", ("data_ingest",)),
                ("data_analysis", ("data_ingest", "embed")),
                ("synthesis", ("data_analysis",)),
            ],
        ),
        (
            "parallel",
            [
                ("data_ingest_0", ()),
                ("data_ingest_1", ()),
                ("data_ingest_2", ()),
                ("data_ingest_3", ()),
                ("embed", ()),
                (
                    "data_analysis",
                    ("data_ingest_0", "data_ingest_1", "data_ingest_2", "data_ingest_3", "embed"),
                ),
                ("synthesis", ("data_analysis",)),
            ],
        ),
        (
            "hybrid",
            [
                ("data_ingest_text", ()),
                ("data_ingest_json", ()),
                ("data_ingest_image", ()),
                ("embed", ("data_ingest_text",)),
                (
                    "data_analysis",
                    ("data_ingest_text", "data_ingest_json", "data_ingest_image", "embed"),
                ),
                ("synthesis", ("data_analysis",)),
            ],
        ),
    ],
)
def test_each_execution_mode_gives_its_dag_shape(mode: str, shape: list[tuple]) -> None:
    params = {"inputs": mixed_inputs(), "execution_mode": mode}
    job = submit("report", params)
    dag = pipelines.get("report").dag(job.params)
    assert [(stage.name, stage.depends_on) for stage in dag.stages] == shape
    assert list(job.stages.order_by("position").values_list("name", flat=True)) == [
        name for name, _ in shape
    ]
    assert {stage.name: stage.queue for stage in dag.stages}["embed"] == "gpu"
    # Only the roots are queued at first.
    queued = set(job.stages.filter(status="queued").values_list("name", flat=True))
    assert queued == {name for name, parents in shape if not parents}


def test_a_report_without_text_inputs_has_no_embed_stage() -> None:
    job = submit("report", {"inputs": [{"input_id": "n", "type": "json", "data": [1, 2]}]})
    assert list(job.stages.order_by("position").values_list("name", flat=True)) == [
        "data_ingest",
        "data_analysis",
        "synthesis",
    ]


def test_every_execution_mode_writes_the_same_report(
    drain: Callable[..., Any], media: Path, client: Any
) -> None:
    reports = {}
    for mode in ("sequential", "parallel", "hybrid"):
        job = run_to_end(
            drain,
            submit(
                "report",
                {
                    "inputs": mixed_inputs(),
                    "execution_mode": mode,
                    "metadata": {"report_title": "Weekly"},
                },
            ),
        )
        assert job.status == JobStatus.COMPLETED, job.error
        assert job.result["execution_mode"] == mode
        _, markdown = served(client, job.result["report"]["markdown_url"])
        reports[mode] = (job.result["summary"], markdown)
    assert reports["parallel"] == reports["sequential"]
    assert reports["hybrid"] == reports["sequential"]


# --- report: content ----------------------------------------------------------------------


def test_a_report_over_text_json_and_an_image_has_the_expected_statistics(
    drain: Callable[..., Any], media: Path
) -> None:
    job = run_to_end(drain, submit("report", {"inputs": mixed_inputs()}))
    assert job.status == JobStatus.COMPLETED, job.error
    assert job.result["inputs"] == 4
    summary = job.result["summary"]
    assert summary["inputs"]["by_type"] == {"text": 2, "json": 1, "image": 1}
    assert summary["inputs"]["items"] == [
        {"input_id": "notes", "type": "text", "words": 6, "sentences": 2, "characters": 30},
        {"input_id": "sales", "type": "json", "values": 15, "numbers": 5},
        {"input_id": "memo", "type": "text", "words": 2, "sentences": 1, "characters": 10},
        {"input_id": "logo", "type": "image", "width": 40, "height": 20, "category": "landscape"},
    ]
    text = summary["text"]
    assert (text["documents"], text["words"], text["sentences"], text["characters"]) == (
        2,
        8,
        3,
        40,
    )
    assert text["unique_words"] == 6  # cats, purr, sleep, all, day, well
    # Cats purr Cats sleep all day Sleep well: 4+4+4+5+3+3+5+4 = 32 letters in 8 words.
    assert text["average_word_length"] == 4.0
    assert text["top_terms"] == [
        {"term": "cats", "count": 2},
        {"term": "sleep", "count": 2},
        {"term": "day", "count": 1},
        {"term": "purr", "count": 1},
        {"term": "well", "count": 1},
    ]
    numbers = summary["json"]
    assert numbers["types"] == {"array": 1, "boolean": 1, "number": 5, "object": 5, "string": 3}
    assert numbers["numeric"] == {
        "$.year": {
            "count": 1,
            "mean": 2024.0,
            "median": 2024.0,
            "stdev": 0.0,
            "min": 2024,
            "max": 2024,
        },
        "$.sales[].amount": {
            "count": 4,
            "mean": 25.0,
            "median": 25.0,
            "stdev": 11.18034,  # population: sqrt(125)
            "min": 10,
            "max": 40,
        },
    }
    [image] = summary["images"]["items"]
    assert image["input_id"] == "logo"
    assert (image["width"], image["height"], image["category"], image["source"]) == (
        40,
        20,
        "landscape",
        "base64",
    )
    assert image["dominant_colors"] == [{"hex": "#ff0000", "share": 1.0}]
    assert summary["images"]["by_category"] == {"landscape": 1}
    assert summary["clusters"]["model"] == "all-MiniLM-L6-v2"


def test_clusters_separate_two_obviously_different_topics(
    drain: Callable[..., Any], media: Path
) -> None:
    inputs = [{"input_id": i, "type": "text", "data": text} for i, text in CAT_TEXTS]
    job = run_to_end(drain, submit("report", {"inputs": inputs, "execution_mode": "parallel"}))
    assert job.status == JobStatus.COMPLETED, job.error
    clusters = job.result["summary"]["clusters"]
    assert clusters["k"] == 2
    assert [cluster["input_ids"] for cluster in clusters["clusters"]] == [
        ["cat-1", "cat-2", "cat-3"],
        ["bank-1", "bank-2", "bank-3"],
    ]
    assert "cat" in clusters["clusters"][0]["top_terms"]
    assert "bank" in clusters["clusters"][1]["top_terms"]
    assert clusters["clusters"][1]["representative"]["input_id"].startswith("bank-")


def test_the_markdown_html_and_json_reports_are_served_from_media(
    drain: Callable[..., Any], media: Path, client: Any
) -> None:
    params = {
        "inputs": mixed_inputs(),
        "metadata": {"report_title": "Quarterly review", "owner": "ops"},
    }
    job = run_to_end(drain, submit("report", params))
    assert job.status == JobStatus.COMPLETED, job.error
    report = job.result["report"]
    assert report == {
        "markdown_url": f"/media/jobs/{job.pk}/report.md",
        "html_url": f"/media/jobs/{job.pk}/report.html",
        "json_url": f"/media/jobs/{job.pk}/summary.json",
    }
    _, markdown = served(client, report["markdown_url"])
    assert markdown.startswith("# Quarterly review\n")
    assert "| owner | ops |" in markdown
    assert "| $.sales\\[\\].amount | 4 | 25 | 25 | 11.1803 | 10 | 40 |" in markdown
    response, page = served(client, report["html_url"])
    assert response["Content-Type"].startswith("text/html")
    assert "<title>Quarterly review</title>" in page
    assert "<h1>Quarterly review</h1>" in page
    assert "<td>$.sales[].amount</td>" in page
    assert "<td>40x20</td>" in page
    _, summary = served(client, report["json_url"])
    assert json.loads(summary) == job.result["summary"]


def test_the_html_report_escapes_markup_from_input_text_and_metadata(
    drain: Callable[..., Any], media: Path, client: Any
) -> None:
    hostile = "<script>alert('x')</script> cats & dogs, see [here](javascript:alert(1))"
    params = {
        "inputs": [
            {"input_id": "<b>id</b>|x", "type": "text", "data": hostile},
            {"input_id": "doc", "type": "json", "data": {"<i>k</i>": 1}},
        ],
        "metadata": {"report_title": "<img src=x onerror=alert(1)>", "note": "**bold**"},
    }
    job = run_to_end(drain, submit("report", params))
    assert job.status == JobStatus.COMPLETED, job.error
    _, page = served(client, job.result["report"]["html_url"])
    for markup in ("<script", "<img", "<b>", "<i>", "href=", "<strong>", "<a "):
        assert markup not in page
    assert "&lt;script&gt;alert('x')&lt;/script&gt; cats &amp; dogs" in page
    assert "[here](javascript:alert(1))" in page
    assert "<title>&lt;img src=x onerror=alert(1)&gt;</title>" in page
    assert "<td>**bold**</td>" in page
    assert '<td>$["&lt;i&gt;k&lt;/i&gt;"]</td>' in page
    # A `|` stays inside its cell.
    assert "<td>&lt;b&gt;id&lt;/b&gt;|x</td>" in page
    _, markdown = served(client, job.result["report"]["markdown_url"])
    assert "<script" not in markdown


def test_an_image_given_by_url_is_fetched_and_classified(
    drain: Callable[..., Any], media: Path, fake_api: Callable[..., FakeApi]
) -> None:
    server = fake_api()
    server.default = (200, {"Content-Type": "image/png"}, red_png(10, 30))
    params = {"inputs": [{"input_id": "pic", "type": "image", "data": f"{server.url}/p.png"}]}
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        job = run_to_end(drain, submit("report", params))
    assert job.status == JobStatus.COMPLETED, job.error
    [image] = job.result["summary"]["images"]["items"]
    assert (image["source"], image["width"], image["height"], image["category"]) == (
        "url",
        10,
        30,
        "portrait",
    )
    assert [request["path"] for request in server.requests] == ["/p.png"]


def test_repeated_input_ids_fail_the_job_without_a_retry(
    drain: Callable[..., Any], media: Path
) -> None:
    inputs = [
        {"input_id": "same", "type": "json", "data": 1},
        {"input_id": "same", "type": "json", "data": 2},
    ]
    job = run_to_end(drain, submit("report", {"inputs": inputs}))
    assert (job.status, job.error["code"], job.attempts) == (JobStatus.FAILED, "INVALID_INPUT", 1)
    assert "same" in job.error["message"]


@pytest.mark.parametrize(
    ("item", "code"),
    [
        ({"input_id": "j", "type": "json", "data": "{not json"}, "INVALID_INPUT"),
        (
            {"input_id": "i", "type": "image", "data": base64.b64encode(b"GIF89a-no").decode()},
            "INVALID_IMAGE",
        ),
        ({"input_id": "i", "type": "image", "data": "missing/file.png"}, "FILE_NOT_FOUND"),
        ({"input_id": "i", "type": "image", "data": "../secret.png"}, "PATH_NOT_ALLOWED"),
    ],
)
def test_bad_input_data_fails_the_job_with_its_code_without_a_retry(
    drain: Callable[..., Any], media: Path, item: dict[str, Any], code: str
) -> None:
    job = run_to_end(drain, submit("report", {"inputs": [item]}))
    assert (job.status, job.error["code"], job.attempts) == (JobStatus.FAILED, code, 1)


def test_an_unknown_input_type_is_refused_at_submission(api: Any) -> None:
    response = api.post(
        "/v1/jobs",
        {
            "pipeline": "report",
            "params": {"inputs": [{"input_id": "v", "type": "video", "data": "x"}]},
        },
        content_type="application/json",
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert "params.inputs.0.type" in body["error"]["details"]
    assert not Job.objects.exists()


# --- data_analysis --------------------------------------------------------------------------


def test_data_analysis_returns_the_statistics_of_its_inputs(drain: Callable[..., Any]) -> None:
    inputs = [
        {"input_id": "prices", "type": "json", "data": [{"p": 1.5}, {"p": 2.5}, {"p": 5}]},
        {"input_id": "a", "type": "text", "data": "Rates rose. Rates fell. Markets shrugged."},
    ]
    job = submit("data_analysis", {"inputs": inputs})
    dag = pipelines.get("data_analysis").dag(job.params)
    assert [(stage.name, stage.depends_on) for stage in dag.stages] == [
        ("data_ingest", ()),
        ("embed", ()),
        ("data_analysis", ("data_ingest", "embed")),
    ]
    job = run_to_end(drain, job)
    assert job.status == JobStatus.COMPLETED, job.error
    result = job.result
    assert result["json"]["numeric"] == {
        "$[].p": {"count": 3, "mean": 3.0, "median": 2.5, "stdev": 1.47196, "min": 1.5, "max": 5}
    }
    assert (result["text"]["words"], result["text"]["sentences"]) == (6, 3)
    assert result["text"]["top_terms"][0] == {"term": "rates", "count": 2}
    assert result["clusters"]["k"] == 1
    assert result["images"] is None


# --- api_call: a fake API -------------------------------------------------------------------

Answer = tuple[int, dict[str, str], bytes]


class FakeApi(http.server.ThreadingHTTPServer):
    """Answers each request with the next entry of `script` (then `default`): an
    (status, headers, body) answer, "drop" (close without an answer) or "stall" (answer
    nothing until `release`). `on_request` runs in the handler thread first."""

    def __init__(self) -> None:
        self.script: list[Answer | str] = []
        self.default: Answer | str = (200, {"Content-Type": "application/json"}, b'{"ok": true}')
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.on_request: Callable[[], None] | None = None
        super().__init__(("127.0.0.1", 0), _ApiHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ApiHandler(http.server.BaseHTTPRequestHandler):
    server: FakeApi

    def _handle(self) -> None:
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        server.requests.append(
            {
                "method": self.command,
                "path": self.path,
                "headers": self.headers.items(),
                "body": self.rfile.read(length),
            }
        )
        if server.on_request is not None:
            server.on_request()
        answer = server.script.pop(0) if server.script else server.default
        if answer == "drop":
            self.close_connection = True
            return
        if answer == "stall":
            server.release.wait(timeout=60)
            self.close_connection = True
            return
        status, headers, body = answer
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[Callable[[], FakeApi]]:
    servers: list[FakeApi] = []

    def start() -> FakeApi:
        server = FakeApi()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


def call(drain: Callable[..., Any], params: dict[str, Any]) -> Job:
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        job = submit("api_call", params)
        drain("default")
    job.refresh_from_db()
    return job


def header_values(request: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in request["headers"] if key.lower() == name.lower()]


def test_a_200_json_answer_is_the_result_and_headers_and_json_are_sent(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = (200, {"Content-Type": "application/json"}, b'{"id": 7, "tags": ["a"]}')
    job = call(
        drain,
        {
            "url": f"{server.url}/items?x=1",
            "method": "POST",
            "headers": {"X-Api-Key": "k-123", "accept": "application/json"},
            "json": {"name": "lamp", "sizes": [1, 2]},
        },
    )
    assert job.status == JobStatus.COMPLETED, job.error
    headers = job.result.pop("headers")
    assert job.result == {
        "status": 200,
        "body": {"id": 7, "tags": ["a"]},
        "body_encoding": "json",
        "url": f"{server.url}/items?x=1",
        "tries": 1,
    }
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(b'{"id": 7, "tags": ["a"]}'))
    [request] = server.requests
    assert (request["method"], request["path"]) == ("POST", "/items?x=1")
    assert json.loads(request["body"]) == {"name": "lamp", "sizes": [1, 2]}
    assert header_values(request, "Content-Type") == ["application/json"]
    assert header_values(request, "X-Api-Key") == ["k-123"]
    assert header_values(request, "Accept") == ["application/json"]


def test_a_get_is_the_default_method_without_a_json_body(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    job = call(drain, {"url": f"{server.url}/health"})
    assert job.status == JobStatus.COMPLETED, job.error
    assert [(r["method"], r["body"]) for r in server.requests] == [("GET", b"")]


@pytest.mark.parametrize(
    ("content_type", "body", "expected", "encoding"),
    [
        ("text/plain; charset=utf-8", "grüße".encode(), "grüße", "text"),
        ("application/json", b"{broken", "{broken", "text"),
        ("application/octet-stream", b"\x00\x01\xff", "AAH/", "base64"),
    ],
)
def test_text_bodies_come_back_as_text_and_binary_ones_as_base64(
    drain: Callable[..., Any],
    fake_api: Callable[[], FakeApi],
    content_type: str,
    body: bytes,
    expected: str,
    encoding: str,
) -> None:
    server = fake_api()
    server.default = (200, {"Content-Type": content_type}, body)
    job = call(drain, {"url": server.url})
    assert job.status == JobStatus.COMPLETED, job.error
    assert (job.result["body"], job.result["body_encoding"]) == (expected, encoding)


def test_a_404_is_the_result_with_the_servers_headers_and_body(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = (
        404,
        {"Content-Type": "application/json", "X-Request-Id": "req-42"},
        b'{"error": "no such item"}',
    )
    job = call(drain, {"url": f"{server.url}/items/9"})
    assert job.status == JobStatus.COMPLETED, job.error
    assert (job.result["status"], job.result["tries"]) == (404, 1)
    assert (job.result["body"], job.result["body_encoding"]) == (
        {"error": "no such item"},
        "json",
    )
    assert job.result["headers"]["x-request-id"] == "req-42"
    assert job.result["headers"]["content-type"] == "application/json"
    assert len(server.requests) == 1


def test_a_delete_is_sent_and_its_answer_is_the_result(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = (200, {"Content-Type": "application/json"}, b'{"deleted": 9}')
    job = call(
        drain, {"url": f"{server.url}/items/9", "method": "DELETE", "headers": {"X-Api-Key": "k"}}
    )
    assert job.status == JobStatus.COMPLETED, job.error
    assert (job.result["status"], job.result["body"]) == (200, {"deleted": 9})
    [request] = server.requests
    assert (request["method"], request["path"], request["body"]) == ("DELETE", "/items/9", b"")
    assert header_values(request, "X-Api-Key") == ["k"]


def test_a_head_returns_the_status_and_headers_without_a_body(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = (200, {"Content-Type": "video/mp4", "ETag": '"v3"'}, b"x" * 5000)
    job = call(drain, {"url": f"{server.url}/video.mp4", "method": "HEAD"})
    assert job.status == JobStatus.COMPLETED, job.error
    assert (job.result["status"], job.result["body"], job.result["body_encoding"]) == (
        200,
        None,
        None,
    )
    assert job.result["headers"]["etag"] == '"v3"'
    assert job.result["headers"]["content-length"] == "5000"
    assert [request["method"] for request in server.requests] == ["HEAD"]


def test_a_post_answered_with_303_is_the_result_and_not_followed(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = (303, {"Location": "/items/7"}, b"")
    job = call(drain, {"url": f"{server.url}/items", "json": {"name": "lamp"}})
    assert job.status == JobStatus.COMPLETED, job.error
    assert (job.result["status"], job.result["headers"]["location"]) == (303, "/items/7")
    assert [request["path"] for request in server.requests] == ["/items"]


def test_a_json_body_goes_with_the_callers_content_type(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    job = call(
        drain,
        {
            "url": server.url,
            "method": "PATCH",
            "headers": {"content-type": "application/merge-patch+json"},
            "json": {"title": None},
        },
    )
    assert job.status == JobStatus.COMPLETED, job.error
    [request] = server.requests
    assert header_values(request, "Content-Type") == ["application/merge-patch+json"]
    assert json.loads(request["body"]) == {"title": None}


@pytest.mark.parametrize("status", [503, 500, 408, 429])
def test_two_answers_asking_to_come_back_then_a_200_succeed_within_one_attempt(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi], status: int
) -> None:
    server = fake_api()
    busy = (status, {"Content-Type": "text/plain"}, b"busy")
    server.script = [busy, busy]
    job = call(drain, {"url": server.url})
    assert job.status == JobStatus.COMPLETED, job.error
    assert (job.attempts, job.result["tries"], job.result["status"]) == (1, 3, 200)
    assert len(server.requests) == 3
    warnings = JobLog.objects.filter(job=job, level="warning").values_list("message", flat=True)
    assert [message.split(":")[0] for message in warnings] == ["try 1 failed", "try 2 failed"]


def test_a_dropped_connection_is_tried_again_within_the_stage(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.script = ["drop"]
    job = call(drain, {"url": server.url})
    assert job.status == JobStatus.COMPLETED, job.error
    assert (job.result["tries"], len(server.requests)) == (2, 2)


def test_a_server_that_always_answers_503_leaves_the_job_retrying_by_the_engine(
    drain: Callable[..., Any], due: Callable[[Job], None], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = (503, {}, b"down")
    job = call(drain, {"url": server.url})
    assert job.status == JobStatus.RETRYING
    [stage] = job.stages.all()
    assert stage.error["code"] == "FETCH_UNAVAILABLE"
    assert "tried 3 times" in stage.error["message"]
    assert len(server.requests) == 3
    # The engine's retry (after its backoff) makes three more tries.
    due(job)
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        drain("default")
    job.refresh_from_db()
    assert (job.status, job.attempts, len(server.requests)) == (JobStatus.RETRYING, 2, 6)


def test_a_server_slower_than_timeout_s_is_given_up_on_and_retried_later(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = "stall"
    job = call(drain, {"url": server.url, "timeout_s": 0.3})
    assert job.status == JobStatus.RETRYING
    [stage] = job.stages.all()
    assert stage.error["code"] == "FETCH_UNAVAILABLE"
    assert "timed out" in stage.error["message"]
    assert len(server.requests) == 3


def test_a_refused_connection_is_retried_then_left_to_the_engine(
    drain: Callable[..., Any],
) -> None:
    job = call(drain, {"url": f"http://127.0.0.1:{free_port()}/"})
    assert job.status == JobStatus.RETRYING
    [stage] = job.stages.all()
    assert stage.error["code"] == "FETCH_FAILED"
    assert "refused" in stage.error["message"]


def test_loopback_is_refused_without_the_setting_and_not_retried(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    job = submit("api_call", {"url": server.url})
    drain("default")
    job.refresh_from_db()
    assert (job.status, job.error["code"], job.attempts) == (JobStatus.FAILED, "URL_NOT_ALLOWED", 1)
    assert server.requests == []


def test_a_body_over_the_cap_fails_without_a_retry(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    from jobs.pipelines.api_call import API_CALL_MAX_RESPONSE_BYTES

    server = fake_api()
    server.default = (200, {"Content-Type": "text/plain"}, b"x" * (API_CALL_MAX_RESPONSE_BYTES + 1))
    job = call(drain, {"url": server.url})
    assert (job.status, job.error["code"], job.attempts) == (JobStatus.FAILED, "FETCH_TOO_LARGE", 1)


@pytest.mark.parametrize(
    "params",
    [
        {"url": "http://example.com/", "method": "GET", "json": {"a": 1}},
        {"url": "http://example.com/", "method": "HEAD", "json": {"a": 1}},
        {"url": "http://example.com/", "method": "DELETE", "json": {"a": 1}},
        {"url": "http://example.com/", "method": "OPTIONS"},
        {"url": "http://example.com/", "headers": {"Host": "evil"}},
        {"url": "http://example.com/", "headers": {"X-A": "one\r\nX-B: two"}},
        {"url": "http://example.com/", "timeout_s": 600},
    ],
)
def test_bad_api_call_params_are_refused_at_submission(params: dict[str, Any]) -> None:
    from omniva.errors import OmnivaError

    with pytest.raises(OmnivaError) as refused:
        submit("api_call", params)
    assert refused.value.code == "VALIDATION_ERROR"


@pytest.mark.django_db(transaction=True)
def test_a_cancel_stops_the_stage_between_tries(
    drain: Callable[..., Any], fake_api: Callable[[], FakeApi]
) -> None:
    server = fake_api()
    server.default = (503, {}, b"down")
    job = submit("api_call", {"url": server.url})

    def cancel_once_called() -> None:
        # The handler runs in the server's thread, on a connection of its own.
        try:
            if not Job.objects.get(pk=job.pk).cancel_requested_at:
                services.job_cancel(job_id=job.pk, reason="enough")
        finally:
            connections.close_all()

    server.on_request = cancel_once_called
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        drain("default")
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert len(server.requests) == 1
