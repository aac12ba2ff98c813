"""Creators and clips through /v1: create, list, get, update, delete, and what a key
bound to a project may see and write."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from jobs.models import Job
from omniva.models import Clip, Creator, Project, Scope
from tests.conftest import KeyHandle

pytestmark = pytest.mark.django_db


def send(client: Any, method: str, path: str, body: Any = None, **headers: str) -> Any:
    return getattr(client, method)(
        path, data=json.dumps(body), content_type="application/json", **headers
    )


@pytest.fixture
def project() -> Project:
    return Project.objects.create(name="alpha")


@pytest.fixture
def other() -> Project:
    return Project.objects.create(name="beta")


def test_a_creator_and_its_clip_are_created_listed_changed_and_deleted(
    api: Any, project: Project
) -> None:
    made = send(api, "post", "/v1/creators", {"project": str(project.pk), "name": "Ann"})
    assert made.status_code == 201, made.json()
    creator_id = made.json()["data"]["id"]
    clip = send(
        api,
        "post",
        "/v1/clips",
        {"project": str(project.pk), "creator": creator_id, "title": "A cat", "duration_s": 12},
    )
    assert clip.status_code == 201, clip.json()
    clip_id = clip.json()["data"]["id"]
    assert clip.json()["data"]["status"] == "ingested"

    listed = api.get(f"/v1/clips?creator={creator_id}").json()
    assert [c["id"] for c in listed["data"]] == [clip_id]
    assert listed["meta"]["pagination"]["count"] == 1

    changed = send(api, "patch", f"/v1/clips/{clip_id}", {"status": "analyzed"})
    assert changed.json()["data"]["status"] == "analyzed"
    renamed = send(api, "patch", f"/v1/creators/{creator_id}", {"handle": "@ann"})
    assert renamed.json()["data"]["handle"] == "@ann"

    assert api.delete(f"/v1/clips/{clip_id}").status_code == 200
    missing = api.get(f"/v1/clips/{clip_id}")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "CLIP_NOT_FOUND")
    assert api.delete(f"/v1/creators/{creator_id}").status_code == 200
    assert not Creator.objects.exists()


def test_a_new_clip_and_a_changed_title_queue_an_embedding_and_a_status_change_does_not(
    api: Any, project: Project
) -> None:
    clip_id = send(api, "post", "/v1/clips", {"project": str(project.pk), "title": "One"}).json()[
        "data"
    ]["id"]
    send(api, "patch", f"/v1/clips/{clip_id}", {"status": "edited"})
    send(api, "patch", f"/v1/clips/{clip_id}", {"transcript": "words"})
    jobs = Job.objects.filter(pipeline="clip_embed").order_by("created_at")
    assert [job.params for job in jobs] == [{"clip_id": clip_id}] * 2
    assert {job.project_id for job in jobs} == {project.pk}


def test_a_clip_without_a_project_or_with_a_creator_of_another_project_is_refused(
    api: Any, project: Project, other: Project
) -> None:
    foreign = Creator.objects.create(project=other, name="Bob")
    no_project = send(api, "post", "/v1/clips", {"title": "x"})
    assert no_project.status_code == 400
    assert no_project.json()["error"]["details"]["project"]
    crossed = send(
        api, "post", "/v1/clips", {"project": str(project.pk), "creator": str(foreign.pk)}
    )
    assert (crossed.status_code, crossed.json()["error"]["code"]) == (400, "VALIDATION_ERROR")
    bad_status = send(api, "post", "/v1/clips", {"project": str(project.pk), "status": "gone"})
    assert bad_status.status_code == 400
    assert not Clip.objects.exists()


def test_a_key_bound_to_a_project_sees_and_writes_only_that_project(
    client: Any,
    make_key: Callable[..., KeyHandle],
    project: Project,
    other: Project,
) -> None:
    theirs = Clip.objects.create(project=other, title="not yours")
    their_creator = Creator.objects.create(project=other, name="Bob")
    key = make_key(Scope.CONTENT, project=project).headers

    made = send(client, "post", "/v1/clips", {"title": "mine"}, **key)
    assert made.status_code == 201
    assert made.json()["data"]["project"] == str(project.pk)
    listed = client.get("/v1/clips", **key).json()["data"]
    assert [c["title"] for c in listed] == ["mine"]
    assert client.get(f"/v1/clips/{theirs.pk}", **key).status_code == 404
    assert send(client, "patch", f"/v1/clips/{theirs.pk}", {"title": "x"}, **key).status_code == (
        404
    )
    assert client.delete(f"/v1/creators/{their_creator.pk}", **key).status_code == 404
    elsewhere = send(client, "post", "/v1/clips", {"project": str(other.pk), "title": "x"}, **key)
    assert elsewhere.status_code == 400
    borrowed = send(client, "post", "/v1/clips", {"creator": str(their_creator.pk)}, **key)
    assert borrowed.status_code == 400
    assert Clip.objects.filter(project=other).count() == 1
    assert client.get(f"/v1/clips/{theirs.pk}/similar", **key).status_code == 404


def test_content_needs_the_content_scope(
    client: Any, make_key: Callable[..., KeyHandle], project: Project
) -> None:
    jobs_only = make_key(Scope.JOBS_READ, Scope.JOBS_WRITE).headers
    refused = client.get("/v1/clips", **jobs_only)
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "PERMISSION_DENIED")
    assert client.get("/v1/creators").status_code == 401


def test_similar_clips_wait_for_the_embedding(api: Any, project: Project) -> None:
    clip = Clip.objects.create(project=project, title="not embedded yet")
    pending = api.get(f"/v1/clips/{clip.pk}/similar")
    assert (pending.status_code, pending.json()["error"]["code"]) == (409, "EMBEDDING_PENDING")


def test_a_second_clip_from_the_same_source_is_a_conflict(api: Any, project: Project) -> None:
    body = {"project": str(project.pk), "title": "one", "source_url": "https://v.test/1.mp4"}
    assert send(api, "post", "/v1/clips", body).status_code == 201
    again = send(api, "post", "/v1/clips", {**body, "title": "two"})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "CONFLICT")
    other = send(api, "post", "/v1/clips", {**body, "source_url": "https://v.test/2.mp4"})
    moved = send(
        api, "patch", f"/v1/clips/{other.json()['data']['id']}", {"source_url": body["source_url"]}
    )
    assert (moved.status_code, moved.json()["error"]["code"]) == (409, "CONFLICT")
    assert sorted(Clip.objects.values_list("source_url", flat=True)) == [
        "https://v.test/1.mp4", "https://v.test/2.mp4",
    ]  # fmt: skip
