"""Destinations, the `publish` pipeline and its adapters against local fakes: signed
webhooks, idempotent publication, retries with backoff, directory output, scoping."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from jobs import services as job_services
from jobs.models import Job, JobStatus
from omniva.models import Clip, Project, Scope
from publishing.models import Destination, Publication, PublicationStatus
from tests.conftest import KeyHandle
from tests.publishing.conftest import SECRET, FakeWebhook, hook_for

pytestmark = pytest.mark.django_db


@pytest.fixture
def project() -> Project:
    return Project.objects.create(name="studio")


@pytest.fixture
def clip(project: Project) -> Clip:
    return Clip.objects.create(project=project, title="Sunset timelapse", transcript="the sun")


def send(client: Any, method: str, path: str, body: Any = None, **headers: str) -> Any:
    return getattr(client, method)(
        path, data=json.dumps(body), content_type="application/json", **headers
    )


def publish(clip: Clip) -> Job:
    job, _ = job_services.job_submit(pipeline="publish", params={"clip_id": str(clip.pk)})
    return job


def test_secrets_are_write_only_and_can_be_rotated_one_at_a_time(
    api: Any, project: Project
) -> None:
    made = send(
        api,
        "post",
        "/v1/destinations",
        {
            "project": str(project.pk),
            "name": "hook",
            "kind": "webhook",
            "config": {"url": "https://example.test/hook"},
            "secrets": {"secret": SECRET, "other": "x"},
        },
    )
    assert made.status_code == 201, made.json()
    data = made.json()["data"]
    assert "secrets" not in data
    assert data["secret_names"] == ["other", "secret"]
    assert SECRET not in made.content.decode()
    changed = send(api, "patch", f"/v1/destinations/{data['id']}", {"secrets": {"other": None}})
    assert changed.json()["data"]["secret_names"] == ["secret"]
    assert Destination.objects.get().secrets == {"secret": SECRET}
    listed = api.get("/v1/destinations")
    assert SECRET not in listed.content.decode()


@pytest.mark.parametrize(
    ("kind", "config", "secret_key"),
    [
        ("webhook", {"url": "https://example.test/hook", "secret": SECRET}, "secret"),
        ("s3", {"bucket": "b", "access_key_id": "AKIA1"}, "access_key_id"),
        ("s3", {"bucket": "b", "secret_access_key": "s3cr3t"}, "secret_access_key"),
        ("printify", {"shop_id": 1, "blueprint_id": 2, "print_provider_id": 3,
                      "variants": [4], "api_token": "pt-9f8e7d"}, "api_token"),
        ("shopify", {"shop": "demo.myshopify.com", "access_token": "shpat_x"}, "access_token"),
        ("directory", {"path": "out", "Password": "hunter2"}, "Password"),
    ],
)  # fmt: skip
def test_a_secret_in_a_destinations_config_is_refused_naming_where_it_belongs(
    api: Any, project: Project, kind: str, config: dict[str, Any], secret_key: str
) -> None:
    body = {"project": str(project.pk), "name": "d", "kind": kind, "config": config}
    refused = send(api, "post", "/v1/destinations", body)

    assert refused.status_code == 400, refused.json()
    error = refused.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert f"config.{secret_key}" in error["details"]
    assert "secrets" in error["message"]
    assert str(config[secret_key]) not in refused.content.decode()
    assert not Destination.objects.exists()

    # Nor can a change put it there.
    clean = {k: v for k, v in config.items() if k != secret_key}
    made = send(api, "post", "/v1/destinations", {**body, "config": clean})
    assert made.status_code == 201, made.json()
    changed = send(
        api, "patch", f"/v1/destinations/{made.json()['data']['id']}", {"config": config}
    )
    assert changed.status_code == 400
    assert Destination.objects.get().config == clean


def test_a_destination_with_a_bad_config_is_refused(api: Any, project: Project) -> None:
    no_url = send(
        api, "post", "/v1/destinations",
        {"project": str(project.pk), "name": "x", "kind": "webhook", "config": {}},
    )  # fmt: skip
    escaping = send(
        api, "post", "/v1/destinations",
        {"project": str(project.pk), "name": "y", "kind": "directory",
         "config": {"path": "../../etc"}},
    )  # fmt: skip
    assert (no_url.status_code, escaping.status_code) == (400, 400)
    assert not Destination.objects.exists()


def test_a_clip_is_published_to_a_signed_webhook_once_even_when_published_again(
    drain: Callable[..., Any], webhook: FakeWebhook, clip: Clip
) -> None:
    hook_for(clip.project, webhook)
    job = publish(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    [publication] = Publication.objects.all()
    assert (publication.status, publication.external_id) == (PublicationStatus.PUBLISHED, "ext-1")
    assert publication.url == "https://platform.test/ext-1"
    [item] = webhook.items.values()
    assert item["item"]["title"] == "Sunset timelapse"
    assert webhook.bad_signatures == 0

    again = publish(clip)  # a re-run of the pipeline
    drain()
    again.refresh_from_db()
    assert again.status == JobStatus.COMPLETED
    assert webhook.requests == 1  # the published row was not sent again
    assert Publication.objects.count() == 1


def test_an_upload_whose_answer_was_lost_is_recognised_by_its_key_on_the_retry(
    drain: Callable[..., Any], due: Callable[[Job], None], webhook: FakeWebhook, clip: Clip
) -> None:
    hook_for(clip.project, webhook)
    webhook.hang_up_next = 1  # the platform keeps the item; we never hear back
    job = publish(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING  # retried with backoff
    publication = Publication.objects.get()
    assert (publication.status, publication.error["code"]) == ("failed", "UPLOAD_FAILED")
    due(job)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    assert webhook.requests == 2
    assert len(webhook.items) == 1  # one item on the platform, not two
    publication.refresh_from_db()
    assert (publication.status, publication.external_id, publication.attempts) == (
        PublicationStatus.PUBLISHED, "ext-1", 2,
    )  # fmt: skip


def test_a_failing_platform_fails_the_publication_and_the_job_retries_with_backoff(
    drain: Callable[..., Any], due: Callable[[Job], None], webhook: FakeWebhook, clip: Clip
) -> None:
    hook_for(clip.project, webhook)
    webhook.fail_next = 1
    job = publish(clip)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING
    assert job.next_attempt_at is not None
    assert Publication.objects.get().error["code"] == "UPLOAD_FAILED"
    due(job)
    drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED
    assert Publication.objects.get().status == PublicationStatus.PUBLISHED


def test_a_directory_destination_gets_the_item_and_its_file(
    drain: Callable[..., Any], clip: Clip, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    (media / "clips").mkdir(parents=True)
    (media / "clips" / "a.mp4").write_bytes(b"not really a video")
    clip.media_url = "clips/a.mp4"
    clip.save()
    Destination.objects.create(
        project=clip.project, name="out", kind="directory", config={"path": "exports/today"}
    )
    with override_settings(MEDIA_ROOT=media, OMNIVA_PUBLISH_ROOT=tmp_path / "publish"):
        job = publish(clip)
        drain()
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    key = Publication.objects.get().idempotency_key
    folder = tmp_path / "publish" / "exports" / "today"
    assert json.loads((folder / f"{key}.json").read_text())["title"] == "Sunset timelapse"
    assert (folder / f"{key}.mp4").read_bytes() == b"not really a video"
    assert sorted(p.name for p in folder.iterdir()) == [f"{key}.json", f"{key}.mp4"]


def test_a_bound_key_sees_only_its_projects_destinations_and_publications(
    client: Any, make_key: Callable[..., KeyHandle], project: Project, clip: Clip
) -> None:
    other = Project.objects.create(name="elsewhere")
    theirs = Destination.objects.create(project=other, name="theirs", kind="directory")
    mine = Destination.objects.create(project=project, name="mine", kind="directory")
    Publication.objects.create(destination=theirs, idempotency_key="k1")
    Publication.objects.create(destination=mine, clip=clip, idempotency_key="k2")
    key = make_key(Scope.CONTENT, project=project).headers
    assert [d["name"] for d in client.get("/v1/destinations", **key).json()["data"]] == ["mine"]
    assert client.get(f"/v1/destinations/{theirs.pk}", **key).status_code == 404
    listed = client.get("/v1/publications", **key).json()["data"]
    assert [p["destination"] for p in listed] == [str(mine.pk)]


def test_the_admin_never_shows_a_secret(client: Any, project: Project) -> None:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_superuser("root", password="pw-123456789")
    client.force_login(user)
    destination = Destination.objects.create(
        project=project, name="hook", kind="webhook",
        config={"url": "https://example.test"}, secrets={"secret": SECRET},
    )  # fmt: skip
    page = client.get(f"/admin/publishing/destination/{destination.pk}/change/")
    assert page.status_code == 200
    assert SECRET not in page.content.decode()
    assert "secret: ••••••" in page.content.decode()
    changed = client.post(
        f"/admin/publishing/destination/{destination.pk}/change/",
        {"project": str(project.pk), "name": "hook", "kind": "webhook",
         "config": '{"url": "https://example.test"}', "active": "on",
         "new_secrets": '{"secret": "rotated"}'},
    )  # fmt: skip
    assert changed.status_code == 302
    destination.refresh_from_db()
    assert destination.secrets == {"secret": "rotated"}


@pytest.mark.parametrize(
    ("kind", "config", "missing"),
    [
        ("s3", {}, "`bucket`"),
        ("printify", {"shop_id": "1"}, "`blueprint_id`"),
        ("shopify", {"api_version": "2024-10"}, "`shop`"),
    ],
)
def test_a_platform_destination_without_what_it_needs_is_refused(
    api: Any, project: Project, kind: str, config: dict[str, Any], missing: str
) -> None:
    answer = send(
        api, "post", "/v1/destinations",
        {"project": str(project.pk), "name": kind, "kind": kind, "config": config},
    )  # fmt: skip
    assert answer.status_code == 400
    assert missing in answer.json()["error"]["details"]["config"][0]
    assert not Destination.objects.exists()
