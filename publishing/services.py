"""Destinations and publishing: every write and transition of the publishing app.

Publishing one item to one destination (`publication_publish`) happens in three steps,
because the platform call cannot be inside a transaction:
1. Under the publication's row lock: a `published` row returns as it is (never sent
   twice); otherwise it becomes `publishing` and counts an attempt. Commit.
2. The adapter sends the item with the publication's idempotency key.
3. Under the lock again: `published` with the platform's id, or `failed` with
   UPLOAD_FAILED (the caller retries with backoff, with the same key), and as `reason`
   the cause's own code where it has one (URL_NOT_ALLOWED: a destination URL leads to
   a private address).
A worker killed between 2 and 3 leaves the row `publishing`; the retry sends the same
key again, and the platform (or the directory's file name) recognises it.
"""

from __future__ import annotations

from typing import Any

from croniter import croniter
from django.db import IntegrityError, transaction
from django.utils import timezone
from django_q.models import Schedule as QSchedule

from jobs.models import Job
from jobs.services import job_submit, pipeline_named
from omniva.errors import ErrorCode, OmnivaError
from omniva.media import checked_name, media_name, media_storage
from omniva.models import Clip, Project
from omniva.services import sha256_hex
from publishing import adapters
from publishing.adapters import secrets_in_config
from publishing.models import Destination, Publication, PublicationStatus, Schedule

DESTINATION_FIELDS = ("name", "kind", "config", "active")


# --- destinations ------------------------------------------------------------------------


def _refuse_secrets_in_config(kind: str, config: dict[str, Any]) -> None:
    """A secret in `config` would be stored in plain and shown in every read (and an
    adapter reads its secrets from `secrets` only): 400 naming it and where it belongs."""
    found = secrets_in_config(kind, config or {})
    if found:
        message = (
            f"`config.{found[0]}` is a secret: give it in `secrets` (write-only, never "
            "shown), not in `config`."
        )
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            message,
            details={f"config.{key}": ["a secret: put it in `secrets`"] for key in found},
        )


def destination_create(
    *, project: Project, secrets: dict[str, Any] | None = None, **fields: Any
) -> Destination:
    _refuse_secrets_in_config(fields.get("kind", ""), fields.get("config") or {})
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
        _refuse_secrets_in_config(locked.kind, locked.config or {})
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
        print_file=_media_file(str(publication.payload.get("design") or "")),
    )


def _media_file(reference: str) -> str | None:
    """The storage name of a media file of ours (`/media/<name>` or the name itself), or
    None: remote media (an http(s) URL) travels as its URL in the item's data, and a name
    the storage does not have (or that would leave it) has no file."""
    if not reference or "://" in reference:
        return None
    try:
        name = checked_name(media_name(reference))
    except OmnivaError:
        return None
    try:
        return name if media_storage().exists(name) else None
    except adapters.STORAGE_ERRORS as exc:  # a bucket that cannot be reached
        raise adapters.AdapterError(f"The media storage could not be read: {exc}") from exc


class PublicationFailed(OmnivaError):
    """UPLOAD_FAILED; `transient` says whether a retry can help (a wrong token cannot)."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(ErrorCode.UPLOAD_FAILED, message)
        self.transient = transient


def publication_publish(*, publication_id: Any) -> Publication:
    """Send the publication (see the module doc); PublicationFailed when the adapter failed."""
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
        error = {
            "code": ErrorCode.UPLOAD_FAILED.value,
            "message": exc.message,
            "transient": exc.transient,
        }
        if exc.code:
            error["reason"] = exc.code
        with transaction.atomic():
            Publication.objects.filter(pk=publication.pk).update(
                status=PublicationStatus.FAILED, error=error, updated_at=timezone.now()
            )
        raise PublicationFailed(
            f"Publishing to {publication.destination} failed: {exc.message}",
            transient=exc.transient,
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


# --- schedules ---------------------------------------------------------------------------

SCHEDULE_FIELDS = ("name", "pipeline", "params", "priority", "cron", "interval_s", "active")
FIRE_TASK = "publishing.tasks.schedule_fire"


def schedule_check(schedule: Schedule) -> None:
    """The schedule's pipeline exists and takes its params; exactly one of a valid cron
    expression or an interval of whole minutes."""
    errors: dict[str, list[str]] = {}
    definition = pipeline_named(schedule.pipeline)
    errors.update(definition.validation_errors(schedule.params))
    if bool(schedule.cron) == (schedule.interval_s is not None):
        errors.setdefault("cron", []).append("Give either `cron` or `interval_s`, not both.")
    if schedule.cron and not croniter.is_valid(schedule.cron):
        errors.setdefault("cron", []).append(f"{schedule.cron!r} is not a cron expression.")
    if schedule.interval_s is not None and (schedule.interval_s < 60 or schedule.interval_s % 60):
        errors.setdefault("interval_s", []).append("A whole number of minutes, 60 or more.")
    if not 0 <= schedule.priority <= 10:
        errors.setdefault("priority", []).append("Between 0 and 10.")
    if errors:
        raise OmnivaError(ErrorCode.VALIDATION_ERROR, "The schedule is not valid.", details=errors)


def _q_schedule_sync(schedule: Schedule, *, timing_changed: bool) -> None:
    """Make django-q2's schedule say what ours says. A new timing (or a reactivation)
    starts from now: the next run is the next one due after this moment."""
    q = schedule.q_schedule or QSchedule(func=FIRE_TASK)
    q.name = f"omniva:{schedule.pk}"
    q.args = repr(str(schedule.pk))
    q.intended_date_kwarg = "intended_at"
    q.repeats = -1 if schedule.active else 0
    if schedule.cron:
        q.schedule_type, q.cron, q.minutes = QSchedule.CRON, schedule.cron, None
    else:
        q.schedule_type, q.cron = QSchedule.MINUTES, None
        q.minutes = (schedule.interval_s or 60) // 60
    if timing_changed or q.pk is None:
        q.next_run = timezone.now()
        q.next_run = q.calculate_next_run(q.next_run)
    q.save()
    if schedule.q_schedule_id != q.pk:
        schedule.q_schedule = q
        schedule.save(update_fields=["q_schedule", "updated_at"])


def schedule_create(*, project: Project, **fields: Any) -> Schedule:
    schedule = Schedule(
        project=project, **{k: v for k, v in fields.items() if k in SCHEDULE_FIELDS}
    )
    schedule_check(schedule)
    with transaction.atomic():
        schedule.save()
        _q_schedule_sync(schedule, timing_changed=True)
        return schedule


def schedule_update(*, schedule: Schedule, changes: dict[str, Any]) -> Schedule:
    with transaction.atomic():
        locked = (
            Schedule.objects.select_for_update(of=("self",))
            .select_related("q_schedule")
            .get(pk=schedule.pk)
        )
        before = (locked.cron, locked.interval_s, locked.active)
        for field in SCHEDULE_FIELDS:
            if field in changes:
                setattr(locked, field, changes[field])
        # A switch from one kind of timing to the other names only the new one.
        if changes.get("cron") and "interval_s" not in changes:
            locked.interval_s = None
        if changes.get("interval_s") is not None and "cron" not in changes:
            locked.cron = ""
        schedule_check(locked)
        locked.save()
        _q_schedule_sync(
            locked, timing_changed=before != (locked.cron, locked.interval_s, locked.active)
        )
        return locked


def schedule_delete(*, schedule: Schedule) -> None:
    with transaction.atomic():
        locked = Schedule.objects.select_for_update().filter(pk=schedule.pk).first()
        if locked is None:
            return
        if locked.q_schedule_id is not None:
            QSchedule.objects.filter(pk=locked.q_schedule_id).delete()
        locked.delete()


def schedule_fire(*, schedule_id: Any, intended_at: str | None = None) -> Job | None:
    """Submit the schedule's job for the run due at `intended_at`; the same run fired
    twice (a scheduler retried, a task redelivered) gives the job it made the first
    time. None when the schedule is gone or inactive."""
    with transaction.atomic():
        schedule = (
            Schedule.objects.select_for_update()
            .select_related("project")
            .filter(pk=schedule_id)
            .first()
        )
        if schedule is None or not schedule.active:
            return None
        run = intended_at or timezone.now().isoformat()
        job, created = job_submit(
            pipeline=schedule.pipeline,
            params=schedule.params,
            priority=schedule.priority,
            project=schedule.project,
            idempotency_key=f"schedule:{schedule.pk}:{run}"[:200],
        )
        if created:
            schedule.runs += 1
            schedule.last_run_at = timezone.now()
            schedule.last_job_id = job.pk
            schedule.save(update_fields=["runs", "last_run_at", "last_job_id", "updated_at"])
        return job
