"""Media and artifacts through Django's storage (omniva/media.py): on an S3 bucket (moto's
server standing in for S3) and on the local folder that is the default."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from jobs import services as job_services
from jobs.models import Job, JobStatus
from omniva.errors import ErrorCode, OmnivaError
from omniva.media import (
    artifact_local,
    artifact_read,
    artifact_save,
    artifact_url,
    artifacts_delete,
    is_local_storage,
    job_artifact_name,
    media_reference,
)
from omniva.models import Clip, Project
from publishing import services
from publishing.models import Destination, PublicationStatus
from tests.conftest import http_get
from tests.publishing.fake_platforms import (
    S3_ACCESS_KEY,
    S3_REGION,
    S3_SECRET_KEY,
    S3Bucket,
    moto_endpoint,
    s3_bucket,
)

pytestmark = pytest.mark.django_db

__all__ = ["moto_endpoint", "s3_bucket"]


@pytest.fixture
def bucket_storage(settings: Any, s3_bucket: S3Bucket) -> S3Bucket:
    """The default storage is the moto bucket (Django drops its storages when STORAGES
    changes, so the next use builds an S3Storage)."""
    settings.STORAGES = {
        **django_settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": s3_bucket.name,
                "endpoint_url": s3_bucket.endpoint,
                "region_name": S3_REGION,
                "access_key": S3_ACCESS_KEY,
                "secret_key": S3_SECRET_KEY,
                "file_overwrite": True,
                "querystring_expire": 600,
            },
        },
    }
    assert not is_local_storage()
    return s3_bucket


def test_artifacts_are_saved_read_and_deleted_in_the_bucket(
    bucket_storage: S3Bucket, tmp_path: Path
) -> None:
    assert artifact_save("jobs/j1/report.md", b"# Report") == "jobs/j1/report.md"
    source = tmp_path / "mockup.png"
    source.write_bytes(b"png bytes")
    artifact_save("jobs/j1/mockups/mockup.png", source)
    with (tmp_path / "notes.txt").open("wb+") as notes:
        notes.write(b"from a file object")
        notes.seek(0)
        artifact_save("jobs/j2/notes.txt", notes)
    artifact_save("jobs/j1/report.md", b"# Report, again")  # replaces, no second name

    assert bucket_storage.keys() == [
        "jobs/j1/mockups/mockup.png",
        "jobs/j1/report.md",
        "jobs/j2/notes.txt",
    ]
    assert bucket_storage.read("jobs/j1/mockups/mockup.png") == b"png bytes"
    assert artifact_read("jobs/j1/report.md") == b"# Report, again"
    assert artifact_read("jobs/j2/notes.txt") == b"from a file object"

    with artifact_local("jobs/j1/mockups/mockup.png") as local:
        assert local.read_bytes() == b"png bytes"
        assert not local.is_relative_to(django_settings.MEDIA_ROOT)
    assert not local.exists()  # the download goes with the block

    artifacts_delete("jobs/j1")
    assert bucket_storage.keys() == ["jobs/j2/notes.txt"]


def test_an_artifact_url_and_media_path_lead_to_the_object_in_the_bucket(
    bucket_storage: S3Bucket, client: Any
) -> None:
    artifact_save("jobs/j1/report.md", b"# Report")
    url = artifact_url("jobs/j1/report.md")
    assert url.startswith(f"{bucket_storage.endpoint}/{bucket_storage.name}/jobs/j1/report.md?")
    assert http_get(url).body == b"# Report"  # a signed URL the bucket honours

    served = client.get("/media/jobs/j1/report.md")
    assert served.status_code == 302
    assert http_get(served["Location"]).body == b"# Report"
    assert client.get("/media/jobs/../../secrets.txt").status_code == 404


def test_a_clip_whose_media_is_in_the_bucket_is_copied_to_a_directory_destination(
    bucket_storage: S3Bucket, settings: Any, tmp_path: Path
) -> None:
    settings.OMNIVA_PUBLISH_ROOT = tmp_path / "publish"
    name = artifact_save("clips/c1/clip.mp4", b"edited video bytes")
    project = Project.objects.create(name="studio")
    clip = Clip.objects.create(project=project, title="Edited", media_url=media_reference(name))
    destination = Destination.objects.create(
        project=project, name="out", kind="directory", config={"path": "exports"}
    )
    publication = services.publication_record(destination=destination, clip=clip)
    published = services.publication_publish(publication_id=publication.pk)

    assert published.status == PublicationStatus.PUBLISHED
    folder = tmp_path / "publish" / "exports"
    key = published.idempotency_key
    assert (folder / f"{key}.mp4").read_bytes() == b"edited video bytes"
    described = json.loads((folder / f"{key}.json").read_text())
    assert described["media_url"] == "/media/clips/c1/clip.mp4"
    assert sorted(p.name for p in folder.iterdir()) == [f"{key}.json", f"{key}.mp4"]


# --- the local default -------------------------------------------------------------------


@pytest.fixture
def local_media(settings: Any, tmp_path: Path) -> Path:
    settings.MEDIA_ROOT = tmp_path / "media"
    assert is_local_storage()
    return settings.MEDIA_ROOT


def test_an_artifact_saved_locally_is_served_under_media(local_media: Path, client: Any) -> None:
    name = artifact_save("jobs/j1/report.md", b"# Local report")
    assert (local_media / "jobs" / "j1" / "report.md").read_bytes() == b"# Local report"
    assert artifact_url(name) == "/media/jobs/j1/report.md"
    served = client.get(artifact_url(name))
    assert served.status_code == 200
    assert b"".join(served.streaming_content) == b"# Local report"
    with artifact_local(name) as local:
        assert local == (local_media / "jobs" / "j1" / "report.md").resolve()


@pytest.mark.parametrize("name", ["../outside.txt", "jobs/../../outside.txt", "/etc/passwd"])
def test_a_media_name_that_leaves_the_storage_is_refused(local_media: Path, name: str) -> None:
    with pytest.raises(OmnivaError) as saving:
        artifact_save(name, b"x")
    assert saving.value.code == ErrorCode.VALIDATION_ERROR
    with pytest.raises(OmnivaError):
        artifact_read(name)
    with pytest.raises(OmnivaError), artifact_local(name):
        pass


@pytest.mark.parametrize("path", ["../outside.txt", "jobs/../../outside.txt"])
def test_media_never_serves_a_file_outside_the_media_root(
    local_media: Path, client: Any, path: str
) -> None:
    (local_media.parent / "outside.txt").write_bytes(b"not for you")
    served = client.get(f"/media/{path}")
    assert served.status_code in (400, 404)
    assert b"not for you" not in b"".join(getattr(served, "streaming_content", [served.content]))


@pytest.mark.django_db(transaction=True)
def test_a_deleted_or_cleaned_up_job_takes_its_artifacts_out_of_the_bucket(
    bucket_storage: S3Bucket,
) -> None:
    ended = timezone.now() - timedelta(days=2)
    deleted, pruned, kept = (
        Job.objects.create(pipeline="echo", status=JobStatus.COMPLETED, finished_at=ended)
        for _ in range(3)
    )
    for job in (deleted, pruned, kept):
        artifact_save(job_artifact_name(job.pk, "report.md"), b"# Report")
    kept.finished_at = timezone.now()
    kept.save(update_fields=["finished_at"])

    job_services.job_delete(job_id=deleted.pk)
    assert job_services.jobs_cleanup(max_age_s=86400) == 1

    assert bucket_storage.keys() == [job_artifact_name(kept.pk, "report.md")]
