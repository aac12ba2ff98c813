"""Project scoping of every content endpoint: a key bound to a project lists, reads,
changes, deletes and creates only in its own project; another project's item is a 404
(its existence is not told) and is left as it was."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from omniva.models import Clip, Creator, Project, Scope
from publishing import services as publishing
from publishing.models import Destination, Publication
from tests.conftest import KeyHandle

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Resource:
    path: str
    make: Callable[[Project], Any]  # one item in the project
    create: dict[str, Any] | None  # a valid body; None: read-only
    change: dict[str, Any] | None

    def __str__(self) -> str:
        return self.path


def _publication(project: Project) -> Publication:
    destination = Destination.objects.create(project=project, name="d", kind="directory")
    return Publication.objects.create(destination=destination, idempotency_key=str(project.pk))


RESOURCES = [
    Resource(
        "creators",
        lambda p: Creator.objects.create(project=p, name="Ann"),
        {"name": "Bea"},
        {"name": "Changed"},
    ),
    Resource(
        "clips",
        lambda p: Clip.objects.create(project=p, title="a clip"),
        {"title": "new clip"},
        {"title": "Changed"},
    ),
    Resource(
        "destinations",
        lambda p: Destination.objects.create(project=p, name="out", kind="directory"),
        {"name": "out2", "kind": "directory", "config": {"path": "x"}},
        {"name": "Changed"},
    ),
    Resource(
        "schedules",
        lambda p: publishing.schedule_create(project=p, pipeline="noop", interval_s=60),
        {"pipeline": "noop", "interval_s": 120},
        {"name": "Changed"},
    ),
    Resource("publications", _publication, None, None),
]


def send(client: Any, method: str, path: str, body: Any = None, **headers: str) -> Any:
    return getattr(client, method)(
        path, data=json.dumps(body), content_type="application/json", **headers
    )


@pytest.fixture
def mine() -> Project:
    return Project.objects.create(name="mine")


@pytest.fixture
def theirs() -> Project:
    return Project.objects.create(name="theirs")


@pytest.fixture
def key(make_key: Callable[..., KeyHandle], mine: Project) -> dict[str, str]:
    return make_key(Scope.CONTENT, project=mine).headers


@pytest.mark.parametrize("resource", RESOURCES, ids=str)
def test_a_bound_key_lists_and_reads_only_its_projects_items(
    client: Any, key: dict[str, str], mine: Project, theirs: Project, resource: Resource
) -> None:
    own = resource.make(mine)
    other = resource.make(theirs)
    listed = client.get(f"/v1/{resource.path}", **key)
    assert listed.status_code == 200
    assert [item["id"] for item in listed.json()["data"]] == [str(own.pk)]
    assert client.get(f"/v1/{resource.path}/{own.pk}", **key).status_code == 200
    hidden = client.get(f"/v1/{resource.path}/{other.pk}", **key)
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"].endswith("NOT_FOUND")
    # Asking for the other project by name shows nothing of it either.
    narrowed = client.get(f"/v1/{resource.path}?project={theirs.pk}", **key)
    assert str(other.pk) not in narrowed.content.decode()


@pytest.mark.parametrize("resource", [r for r in RESOURCES if r.change], ids=str)
def test_a_bound_key_cannot_change_or_delete_another_projects_item(
    client: Any, key: dict[str, str], theirs: Project, resource: Resource
) -> None:
    other = resource.make(theirs)
    before = type(other).objects.filter(pk=other.pk).values().get()
    changed = send(client, "patch", f"/v1/{resource.path}/{other.pk}", resource.change, **key)
    assert changed.status_code == 404
    assert client.delete(f"/v1/{resource.path}/{other.pk}", **key).status_code == 404
    assert type(other).objects.filter(pk=other.pk).values().get() == before


@pytest.mark.parametrize("resource", [r for r in RESOURCES if r.create], ids=str)
def test_a_bound_key_creates_in_its_own_project_and_not_in_another(
    client: Any, key: dict[str, str], mine: Project, theirs: Project, resource: Resource
) -> None:
    made = send(client, "post", f"/v1/{resource.path}", resource.create, **key)
    assert made.status_code == 201, made.json()
    assert made.json()["data"]["project"] == str(mine.pk)
    elsewhere = send(
        client, "post", f"/v1/{resource.path}", {**resource.create, "project": str(theirs.pk)},
        **key,
    )  # fmt: skip
    assert elsewhere.status_code == 400
    model = type(resource.make(mine))
    assert not model.objects.filter(project=theirs).exists()


@pytest.mark.parametrize("resource", [r for r in RESOURCES if r.create], ids=str)
def test_an_item_cannot_be_moved_to_another_project(
    client: Any, key: dict[str, str], mine: Project, theirs: Project, resource: Resource
) -> None:
    own = resource.make(mine)
    send(client, "patch", f"/v1/{resource.path}/{own.pk}", {"project": str(theirs.pk)}, **key)
    own.refresh_from_db()
    assert own.project_id == mine.pk


def test_a_bound_key_sees_only_its_project_and_cannot_make_or_delete_projects(
    client: Any, key: dict[str, str], mine: Project, theirs: Project
) -> None:
    listed = client.get("/v1/projects", **key).json()["data"]
    assert [p["id"] for p in listed] == [str(mine.pk)]
    assert client.get(f"/v1/projects/{theirs.pk}", **key).status_code == 404
    assert send(client, "patch", f"/v1/projects/{theirs.pk}", {"name": "x"}, **key).status_code == (
        404
    )
    assert send(client, "post", "/v1/projects", {"name": "new"}, **key).status_code == 403
    assert client.delete(f"/v1/projects/{mine.pk}", **key).status_code == 403
    assert sorted(Project.objects.values_list("name", flat=True)) == ["mine", "theirs"]


def test_similar_never_reaches_into_another_project(
    client: Any, key: dict[str, str], theirs: Project
) -> None:
    # (Search is scoped to the key's project in tests/jobs/test_clip_search.py, which
    # runs the gpu worker its query needs.)
    other = Clip.objects.create(project=theirs, title="theirs", embedding=[0.1] * 384)
    assert client.get(f"/v1/clips/{other.pk}/similar", **key).status_code == 404
