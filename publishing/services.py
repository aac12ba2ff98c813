"""Destinations and publishing: every write and transition of the publishing app.

Publishing one item to one destination (`publication_publish`) happens in three steps,
because the platform call cannot be inside a transaction:
1. Under the publication's row lock: a `published` row returns as it is (never sent
   twice); otherwise it becomes `publishing` and counts an attempt. Commit.
2. The adapter sends the item with the publication's idempotency key.
3. Under the lock again: `published` with the platform's id, or `failed` with
   UPLOAD_FAILED (the caller retries with backoff, with the same key).
A worker killed between 2 and 3 leaves the row `publishing`; the retry sends the same
key again, and the platform (or the directory's file name) recognises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from omniva import outbound
from omniva.errors import ErrorCode, OmnivaError
from omniva.media import media_name
from omniva.models import Clip, Project
from omniva.services import sha256_hex
from publishing import adapters
from publishing.models import Destination, Publication, PublicationStatus

DESTINATION_FIELDS = ("name", "kind", "config", "active")


# --- destinations ------------------------------------------------------------------------


def destination_create(
    *, project: Project, secrets: dict[str, Any] | None = None, **fields: Any
) -> Destination:
    with transaction.atomic():
        return Destination.objects.create(
            project=project,
            secrets=secrets or {},
            **{k: v for k, v in fields.items() if k in DESTINATION_FIELDS},
        )


def destination_update(*, destination: Destination, changes: dict[str, Any]) -> Destination:
    """Change a destination; `secrets` given are merged in (a null value removes one),
    so a client can rotate one secret without knowing the others."""
    with transaction.atomic():
        locked = Destination.objects.select_for_update().get(pk=destination.pk)
        for field in DESTINATION_FIELDS:
            if field in changes:
                setattr(locked, field, changes[field])
        if "secrets" in changes:
            merged = {**locked.secrets, **changes["secrets"]}
            locked.secrets = {k: v for k, v in merged.items() if v is not None}
        locked.save()
        return locked


def destination_delete(*, destination: Destination) -> None:
    with transaction.atomic():
        Destination.objects.filter(pk=destination.pk).delete()


# --- publications ------------------------------------------------------------------------


def publication_key(*, destination: Destination, clip: Clip | None, artifact: str) -> str:
    """The same item to the same destination always has the same key."""
    what = f"clip:{clip.pk}" if clip is not None else f"artifact:{artifact}"
    return sha256_hex(f"{destination.pk}:{what}")[:64]


def publication_record(
    *,
    destination: Destination,
    clip: Clip | None = None,
    artifact: str = "",
    payload: dict[str, Any] | None = None,
) -> Publication:
    """The publication of this item to this destination, made on first use."""
    key = publication_key(destination=destination, clip=clip, artifact=artifact)
    try:
        with transaction.atomic():
            publication, _ = Publication.objects.get_or_create(
                destination=destination,
                idempotency_key=key,
                defaults={"clip": clip, "artifact": artifact, "payload": payload or {}},
            )
            return publication
    except IntegrityError:  # made at the same moment by another attempt
        return Publication.objects.get(destination=destination, idempotency_key=key)


def _item(publication: Publication) -> adapters.Item:
    clip = publication.clip
    if clip is not None:
        data = {
            "kind": "clip",
            "id": str(clip.pk),
            "project": str(clip.project_id),
            "title": clip.title,
            "source_url": clip.source_url,
            "media_url": clip.media_url,
            "duration_s": clip.duration_s,
            "transcript": clip.transcript,
            "analysis": clip.analysis,
        }
        return adapters.Item(data=data, file=_media_file(clip.media_url))
    return adapters.Item(
        data={**publication.payload, "kind": "artifact", "path": publication.artifact},
        file=_media_file(publication.artifact),
    )


def _media_file(name: str) -> Path | None:
    """A file of ours under the media root, or None (remote media is sent as its URL)."""
    if not name or "://" in name:
        return None
    try:
        return outbound.media_path(media_name(name))
    except outbound.OutboundError:
        return None


def publication_publish(*, publication_id: Any) -> Publication:
    """Send the publication (see the module doc); UPLOAD_FAILED when the adapter failed."""
    with transaction.atomic():
        publication = (
            Publication.objects.select_for_update(of=("self",))
            .select_related("destination", "clip")
            .get(pk=publication_id)
        )
        if publication.status == PublicationStatus.PUBLISHED:
            return publication
        publication.status = PublicationStatus.PUBLISHING
        publication.attempts += 1
        publication.save(update_fields=["status", "attempts", "updated_at"])
    try:
        sent = adapters.publish(
            publication.destination, _item(publication), publication.idempotency_key
        )
    except adapters.AdapterError as exc:
        with transaction.atomic():
            Publication.objects.filter(pk=publication.pk).update(
                status=PublicationStatus.FAILED,
                error={"code": ErrorCode.UPLOAD_FAILED.value, "message": exc.message},
                updated_at=timezone.now(),
            )
        raise OmnivaError(
            ErrorCode.UPLOAD_FAILED,
            f"Publishing to {publication.destination} failed: {exc.message}",
        ) from exc
    with transaction.atomic():
        Publication.objects.filter(pk=publication.pk).update(
            status=PublicationStatus.PUBLISHED,
            external_id=sent.external_id[:500],
            url=sent.url[:2048],
            error=None,
            published_at=timezone.now(),
            updated_at=timezone.now(),
        )
    publication.refresh_from_db()
    return publication
