"""Hostile input against /v1 and the pipelines: deeply nested and invalid bodies,
bad ids, huge paging, path traversal and SSRF. Each is refused with a clear code and
writes nothing (rows are counted before and after).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from jobs import services as job_services
from jobs.models import Job, JobStatus
from omniva.api.pagination import MAX_OFFSET
from omniva.models import Creator, Project
from publishing.models import Destination
from tests.jobs.conftest import drain, stop_job_listener  # noqa: F401 (fixtures)


class CountingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    do_POST = do_PUT = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A server on 127.0.0.1 that counts requests: SSRF must never reach it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    server.hits = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def assert_refused(response: Any, status: int, code: str) -> None:
    body = response.json()
    assert (response.status_code, body["status"], body["error"]["code"]) == (
        status,
        "error",
        code,
    ), body


def test_deeply_nested_json_is_refused_and_writes_no_job(api: Any) -> None:
    before = Job.objects.count()
    body = '{"pipeline": "noop", "params": ' + nested(100_000) + "}"
    response = api.post("/v1/jobs", body, content_type="application/json")
    print(f"jobs before {before}, after {Job.objects.count()}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] in {"MALFORMED_REQUEST", "VALIDATION_ERROR"}
    assert Job.objects.count() == before


def test_invalid_utf8_body_is_malformed_request_and_writes_no_project(api: Any) -> None:
    before = Project.objects.count()
    response = api.post(
        "/v1/projects", b'{"name": "caf\xc3\x28\xff"}', content_type="application/json"
    )
    print(f"projects before {before}, after {Project.objects.count()}")
    assert_refused(response, 400, "MALFORMED_REQUEST")
    assert Project.objects.count() == before


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/-1",
        "/v1/jobs/abc",
        "/v1/jobs/99999999999999999999999",
        "/v1/projects/-1",
        "/v1/projects/abc",
        "/v1/engine-instances/-1",
        "/v1/events/abc",
        "/v1/destinations/0",
    ],
)
def test_negative_and_non_numeric_ids_are_an_enveloped_404(api: Any, path: str) -> None:
    response = api.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"].endswith("NOT_FOUND")


def test_the_largest_offset_answers_an_empty_page(api: Any) -> None:
    response = api.get(f"/v1/jobs?limit=500&offset={MAX_OFFSET}")
    assert response.status_code == 200
    assert response.json()["data"] == []
    assert response.json()["meta"]["pagination"]["offset"] == MAX_OFFSET


@pytest.mark.parametrize("path", ["../../etc", "/etc", "a/../../b", ".."])
def test_a_directory_destination_outside_the_publish_root_is_refused(api: Any, path: str) -> None:
    project = Project.objects.create(name="p")
    before = Destination.objects.count()
    response = api.post(
        "/v1/destinations",
        {"project": str(project.pk), "name": "d", "kind": "directory", "config": {"path": path}},
        content_type="application/json",
    )
    print(f"destinations before {before}, after {Destination.objects.count()}")
    assert_refused(response, 400, "VALIDATION_ERROR")
    assert Destination.objects.count() == before


@pytest.mark.parametrize("name", ["../settings.py", "..%2f..%2fetc%2fpasswd", "%2e%2e/x"])
def test_media_paths_cannot_leave_the_media_root(client: Any, name: str) -> None:
    response = client.get(f"/media/{name}")
    assert response.status_code in {400, 404}
    assert b"SECRET_KEY" not in response.content


def run_job(
    run_queue: Callable[..., Any], pipeline: str, params: dict[str, Any], queue: str
) -> Job:
    job, _ = job_services.job_submit(pipeline=pipeline, params=params)
    run_queue(queue)
    job.refresh_from_db()
    return job


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/x.png",
        "http://localhost:{port}/x.png",
        "http://[::ffff:127.0.0.1]:{port}/x.png",
        "http://2130706433:{port}/x.png",
    ],
)
def test_a_report_image_url_at_a_loopback_address_is_refused_and_never_requested(
    drain: Callable[..., Any],  # noqa: F811
    loopback_server: http.server.ThreadingHTTPServer,
    url: str,
) -> None:
    port = loopback_server.server_address[1]
    params = {"inputs": [{"input_id": "i", "type": "image", "data": url.format(port=port)}]}
    job = run_job(drain, "report", params, "default")
    drain("gpu")
    drain("default")
    job.refresh_from_db()
    print(f"requests that reached the loopback server: {loopback_server.hits}")  # type: ignore[attr-defined]
    assert job.status == JobStatus.FAILED
    assert "URL_NOT_ALLOWED" in str(job.error) or "URL_NOT_ALLOWED" in str(
        [stage.error for stage in job.stages.all()]
    )
    assert loopback_server.hits == 0  # type: ignore[attr-defined]


def test_a_creator_source_url_at_a_private_address_is_refused_by_clipfarm(
    drain: Callable[..., Any],  # noqa: F811
    loopback_server: http.server.ThreadingHTTPServer,
) -> None:
    project = Project.objects.create(name="p")
    creator = Creator.objects.create(
        project=project,
        name="c",
        source_url=f"http://127.0.0.1:{loopback_server.server_address[1]}/feed.xml",
    )
    job, _ = job_services.job_submit(
        pipeline="clipfarm", params={"creator": str(creator.pk)}, project=project
    )
    for _ in range(3):
        drain("default")
        drain("gpu")
    job.refresh_from_db()
    print(f"requests that reached the loopback server: {loopback_server.hits}")  # type: ignore[attr-defined]
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "URL_NOT_ALLOWED"
    assert loopback_server.hits == 0  # type: ignore[attr-defined]


def test_text_with_the_null_character_is_refused_naming_where_and_writes_nothing(
    api: Any,
) -> None:
    # PostgreSQL stores U+0000 in neither text nor jsonb: refused where the body is parsed.
    from engines.models import EngineInstance, Event, EventType

    engine = EngineInstance.objects.create(engine_type="actor", name="nul")
    EventType.objects.create(name="speak", engine_type="actor")
    before = (Job.objects.count(), Event.objects.count(), Project.objects.count())
    refused = [
        (
            api.post,
            "/v1/jobs",
            {"pipeline": "engine_echo", "params": {"message": "a\u0000b"}},
            "params.message",
        ),
        (api.post, "/v1/jobs", {"pipeline": "noop", "params": {"k\u0000": 1}}, "params"),
        (api.post, "/v1/jobs/batch", {"items": [{"pipeline": "noop\u0000"}]}, "items.0.pipeline"),
        (
            api.post,
            "/v1/events",
            {"event_type": "speak", "data": {"l": ["x", "\u0000"]}},
            "data.l.1",
        ),
        (api.post, "/v1/projects", {"name": "\u0000"}, "name"),
        (
            api.put,
            f"/v1/engine-instances/{engine.pk}/heartbeat",
            {"status": "idle", "resource_utilization": {"gpu\u0000": 1}},
            "resource_utilization",
        ),
    ]
    for call, path, body, where in refused:
        response = call(path, body, content_type="application/json")
        assert response.status_code == 400, (path, response.content)
        error = response.json()["error"]
        assert error["code"] == "VALIDATION_ERROR"
        assert where in error["details"], (path, error)

    assert (Job.objects.count(), Event.objects.count(), Project.objects.count()) == before
    assert EngineInstance.objects.get(pk=engine.pk).last_heartbeat == engine.last_heartbeat


@pytest.mark.parametrize(
    "path",
    ["/v1/projects?search=%00", "/v1/jobs?idempotency_key=a%00b", "/v1/jobs?pipe%00line=noop"],
)
def test_a_query_string_with_the_null_character_is_refused_naming_the_parameter(
    api: Any, path: str
) -> None:
    response = api.get(path)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert set(error["details"]) <= {"search", "idempotency_key", "pipeline"}
