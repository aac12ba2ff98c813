"""Media and artifacts: files pipelines make (upscaled pictures, edited videos,
thumbnails, mockups, reports) and the web view that serves the local ones.

Every artifact goes through Django's default storage (settings.STORAGES): a folder
under var/ by default, an S3 bucket when OMNIVA_S3_BUCKET is set. Names are
'/'-separated and relative; a job's artifacts live under `jobs/<job id>/` and go with
the job. Stages keep their scratch files in the job's local folder
(jobs.services.job_files) and store what they hand on with `artifact_save`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from django.conf import settings
from django.core.files.base import ContentFile, File
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.http import Http404, HttpRequest, HttpResponseBase, HttpResponseRedirect
from django.views.static import serve

from omniva import outbound
from omniva.errors import ErrorCode, OmnivaError


def media_file(request: HttpRequest, path: str) -> HttpResponseBase:
    """`/media/<name>`: the file from MEDIA_ROOT, or a redirect to the bucket's (signed)
    URL, so `/media/<name>` is the one lasting address of an artifact either way."""
    if not is_local_storage():
        try:
            return HttpResponseRedirect(artifact_url(path))
        except OmnivaError as exc:
            raise Http404(exc.message) from exc
    # The root is read per request (it is a setting; tests and `serve` change it).
    return serve(request, path, document_root=str(settings.MEDIA_ROOT))


def media_reference(name: str) -> str:
    """The lasting address of a stored artifact (`/media/<name>`), for what is kept in
    the database; `media_name` turns it back into the name."""
    return "/" + settings.MEDIA_URL.strip("/") + "/" + checked_name(name)


def media_name(value: str) -> str:
    """A media file's name under the media root, from its served URL path (`/media/…`,
    what pipelines return) or from the name itself."""
    prefix = "/" + settings.MEDIA_URL.strip("/") + "/"
    return value[len(prefix) :] if value.startswith(prefix) else value


def media_storage() -> Storage:
    return storages["default"]


def is_local_storage() -> bool:
    return isinstance(media_storage(), FileSystemStorage)


def job_artifact_name(job_id: Any, filename: str) -> str:
    return f"jobs/{job_id}/{filename}"


def checked_name(name: str) -> str:
    """`name` if it is a relative '/'-separated name that stays inside the storage."""
    path = PurePosixPath(name) if isinstance(name, str) else None
    if path is None or not name or "\x00" in name or path.is_absolute() or ".." in path.parts:
        raise OmnivaError(ErrorCode.VALIDATION_ERROR, f"{name!r} is not a valid media name.")
    return str(path)


def artifact_save(name: str, content: bytes | IO[bytes] | Path) -> str:
    """Store `content` under `name` (replacing what was there); returns the name."""
    name = checked_name(name)
    if isinstance(content, bytes):
        return media_storage().save(name, ContentFile(content))
    if isinstance(content, Path):
        if is_local_storage() and Path(media_storage().path(name)).resolve() == content.resolve():
            return name  # a stage's file already where the storage keeps it
        with content.open("rb") as source:
            return media_storage().save(name, File(source))
    return media_storage().save(name, File(content))


def artifact_url(name: str) -> str:
    """Where a client fetches the artifact: `/media/<name>` locally, a (signed) bucket
    URL on S3."""
    return media_storage().url(checked_name(name))


def artifact_read(name: str) -> bytes:
    with media_storage().open(checked_name(name), "rb") as stored:
        return stored.read()


@contextmanager
def artifact_local(name: str) -> Iterator[Path]:
    """A local file with the artifact's content: the file itself on local storage
    (checked to stay under MEDIA_ROOT), a temporary download from a bucket."""
    if is_local_storage():
        yield outbound.media_path(checked_name(name))
        return
    with tempfile.TemporaryDirectory(prefix="omniva-artifact-") as folder:
        local = Path(folder) / PurePosixPath(name).name
        with media_storage().open(checked_name(name), "rb") as stored, local.open("wb") as out:
            shutil.copyfileobj(stored, out)
        yield local


def artifacts_delete(prefix: str) -> None:
    """Remove every artifact under the folder `prefix` (a job's, when it is deleted)."""
    storage = media_storage()
    prefix = checked_name(prefix).rstrip("/")
    if is_local_storage():
        shutil.rmtree(Path(storage.path(prefix)), ignore_errors=True)
        return
    pending = [prefix]
    while pending:
        folder = pending.pop()
        folders, files = storage.listdir(folder)
        pending.extend(f"{folder}/{sub}" for sub in folders)
        for file in files:
            storage.delete(f"{folder}/{file}")
