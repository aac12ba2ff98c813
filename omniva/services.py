"""Writes of the core: API keys, projects, the audit trail, rate limits, the admin user."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from omniva import selectors
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import (
    ACTIVITY_CHANNEL,
    KEY_PREFIX,
    Activity,
    ApiKey,
    AuditRecord,
    Clip,
    Creator,
    Project,
    Scope,
    api_key_hash,
)

logger = logging.getLogger("omniva")

# last_used_at is a hint for operators, not an audit trail: refresh it at most this often
# so that authentication does not add a write to every request.
KEY_USE_RESOLUTION = timedelta(seconds=60)


# --- API keys ------------------------------------------------------------------------------


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def api_key_create(
    *, name: str, scopes: list[str], project: Project | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns it with the secret, which is shown once and never stored."""
    name = name.strip()
    if not name:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR, "A key needs a name.", details={"name": ["required"]}
        )
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"Unknown scope(s): {', '.join(unknown)}; known: {', '.join(Scope.values)}.",
            details={"scopes": unknown},
        )
    prefix = secrets.token_hex(6)
    raw = f"{KEY_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    try:
        with transaction.atomic():
            key = ApiKey.objects.create(
                name=name,
                prefix=prefix,
                key_hash=api_key_hash(raw),
                scopes=sorted(set(scopes)),
                project=project,
            )
    except IntegrityError:
        raise OmnivaError(ErrorCode.CONFLICT, f"A key named {name!r} already exists.") from None
    return key, raw


def api_key_revoke(*, name: str) -> ApiKey:
    with transaction.atomic():
        key = ApiKey.objects.select_for_update().filter(name=name).first()
        if key is None:
            raise OmnivaError(ErrorCode.API_KEY_NOT_FOUND, f"No key named {name!r}.")
        if key.revoked_at is None:
            key.revoked_at = timezone.now()
            key.save(update_fields=["revoked_at"])
    selectors.api_keys_forget()
    return key


def api_key_mark_used(*, key: ApiKey) -> None:
    now = timezone.now()
    if key.last_used_at is not None and now - key.last_used_at < KEY_USE_RESOLUTION:
        return
    # A conditional UPDATE, no lock: concurrent requests with the same key race
    # harmlessly, and at most one of them writes per resolution window.
    ApiKey.objects.filter(pk=key.pk).exclude(last_used_at__gt=now - KEY_USE_RESOLUTION).update(
        last_used_at=now
    )
    key.last_used_at = now


# --- Projects ------------------------------------------------------------------------------


def project_create(*, name: str, description: str = "") -> Project:
    try:
        with transaction.atomic():
            return Project.objects.create(name=name, description=description)
    except IntegrityError:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"A project named {name!r} already exists.",
            details={"name": ["A project with this name already exists."]},
        ) from None


def project_update(*, project: Project, changes: dict[str, Any]) -> Project:
    try:
        with transaction.atomic():
            locked = Project.objects.select_for_update().get(pk=project.pk)
            for field in ("name", "description"):
                if field in changes:
                    setattr(locked, field, changes[field])
            locked.save()
            return locked
    except IntegrityError:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            "A project with this name already exists.",
            details={"name": ["A project with this name already exists."]},
        ) from None


def project_delete(*, project: Project) -> None:
    with transaction.atomic():
        Project.objects.filter(pk=project.pk).delete()


# --- Content: creators and clips ----------------------------------------------------------

CREATOR_FIELDS = ("name", "handle", "platform", "source_url", "active")
CLIP_FIELDS = (
    "creator", "title", "source_url", "media_url", "duration_s", "transcript", "status",
    "analysis",
)  # fmt: skip

# Set by the jobs app at start (the core imports no app): queues the job that embeds a
# clip's title and transcript, in the caller's transaction (a clip is never left
# changed without the job that embeds it).
_clip_embedding_hook: Callable[[Clip], object] | None = None


def register_clip_embedding_hook(hook: Callable[[Clip], object]) -> None:
    """What embeds a clip whose title or transcript changed (jobs' AppConfig.ready)."""
    global _clip_embedding_hook
    _clip_embedding_hook = hook


def _creator_in_project(creator: Creator | None, project: Project) -> None:
    if creator is not None and creator.project_id != project.pk:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            "The creator belongs to another project.",
            details={"creator": ["The creator belongs to another project."]},
        )


def creator_create(*, project: Project, **fields: Any) -> Creator:
    with transaction.atomic():
        return Creator.objects.create(
            project=project, **{k: v for k, v in fields.items() if k in CREATOR_FIELDS}
        )


def creator_update(*, creator: Creator, changes: dict[str, Any]) -> Creator:
    with transaction.atomic():
        locked = Creator.objects.select_for_update().get(pk=creator.pk)
        for field in CREATOR_FIELDS:
            if field in changes:
                setattr(locked, field, changes[field])
        locked.save()
        return locked


def creator_delete(*, creator: Creator) -> None:
    with transaction.atomic():
        Creator.objects.filter(pk=creator.pk).delete()


def _request_embedding(clip: Clip) -> None:
    if _clip_embedding_hook is not None and clip.text_for_embedding():
        _clip_embedding_hook(clip)


def _source_taken() -> OmnivaError:
    return OmnivaError(
        ErrorCode.CONFLICT,
        "The project already has a clip from this source.",
        details={"source_url": ["The project already has a clip from this source."]},
    )


def clip_create(*, project: Project, **fields: Any) -> Clip:
    _creator_in_project(fields.get("creator"), project)
    try:
        with transaction.atomic():
            clip = Clip.objects.create(
                project=project, **{k: v for k, v in fields.items() if k in CLIP_FIELDS}
            )
            _request_embedding(clip)
            return clip
    except IntegrityError as exc:
        raise _source_taken() from exc


def clip_ingest(*, project: Project, source_url: str, **fields: Any) -> tuple[Clip, bool]:
    """The project's clip of `source_url`, made (and queued for embedding) unless it was
    ingested before: (clip, created). Two ingests of one source at once make one clip."""
    existing = Clip.objects.filter(project=project, source_url=source_url).first()
    if existing is not None:
        return existing, False
    try:
        return clip_create(project=project, source_url=source_url, **fields), True
    except OmnivaError:
        return Clip.objects.get(project=project, source_url=source_url), False


def clip_update(*, clip: Clip, changes: dict[str, Any]) -> Clip:
    """Change a clip; a new title or transcript queues a new embedding."""
    with transaction.atomic():
        locked = Clip.objects.select_for_update().get(pk=clip.pk)
        if "creator" in changes:
            _creator_in_project(changes["creator"], locked.project)
        text_before = locked.text_for_embedding()
        for field in CLIP_FIELDS:
            if field in changes:
                setattr(locked, field, changes[field])
        try:
            with transaction.atomic():
                locked.save()
        except IntegrityError as exc:
            raise _source_taken() from exc
        if locked.text_for_embedding() != text_before:
            _request_embedding(locked)
        return locked


def clip_delete(*, clip: Clip) -> None:
    with transaction.atomic():
        Clip.objects.filter(pk=clip.pk).delete()


def clip_embedding_store(*, clip_id: Any, text: str, vector: list[float]) -> bool:
    """Store the vector of `text` on the clip, unless its text changed since (the job
    of the new text stores that one): whether it was stored. A deleted clip is no error."""
    with transaction.atomic():
        clip = Clip.objects.select_for_update().filter(pk=clip_id).first()
        if clip is None or clip.text_for_embedding() != text:
            return False
        clip.embedding = vector
        clip.embedded_text = sha256_hex(text)
        clip.embedded_at = timezone.now()
        clip.save(update_fields=["embedding", "embedded_text", "embedded_at"])
        return True


# --- Audit ---------------------------------------------------------------------------------


_AUDIT_COLUMNS = (
    "request_id", "at", "api_key_id", "key_name", "user_id", "method", "path", "status",
    "duration_ms", "remote_addr", "entity_ids",
)  # fmt: skip
_AUDIT_COPY_SQL = f"COPY {AuditRecord._meta.db_table} ({', '.join(_AUDIT_COLUMNS)}) FROM STDIN"


def _audit_row(fields: dict[str, Any]) -> tuple:
    key, user = fields.get("api_key"), fields.get("user")
    return (
        fields.get("request_id", ""),
        fields["at"],
        key.pk if key is not None else None,
        fields.get("key_name", ""),
        user.pk if user is not None else None,
        fields.get("method", ""),
        fields.get("path", ""),
        fields["status"],
        fields["duration_ms"],
        fields.get("remote_addr"),
        list(fields.get("entity_ids") or []),
    )


def audit_record_write(**fields: Any) -> None:
    """Write one audit row. Never raises: a lost audit row must not fail a request."""
    audit_records_write(records=[fields])


def audit_records_write(*, records: list[dict[str, Any]]) -> bool:
    """Write audit rows in one statement (omniva/audit.py batches a web process's rows).
    Never raises: a lost audit row must not fail a request. False when the database was
    unavailable, so that the caller may keep the rows and try again."""
    if not records:
        return True
    try:
        # COPY, not an INSERT of many rows: no SQL to build or parse per row (the ORM's
        # bulk insert was a fifth of a web process's CPU under load).
        with (
            connection.cursor() as cursor,
            connection.wrap_database_errors,  # psycopg's errors as Django's, as for execute
            cursor.cursor.copy(_AUDIT_COPY_SQL) as copy,
        ):
            for fields in records:
                copy.write_row(_audit_row(fields))
        return True
    except (OperationalError, InterfaceError) as exc:
        # The database is gone (a restart, a failover): every request says so, and a
        # traceback each would bury the log. One line names the request and the cause.
        logger.warning(
            "could not write the audit record of %s%s: database unavailable (%s)",
            records[0].get("request_id"),
            f" and {len(records) - 1} more" if len(records) > 1 else "",
            str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__,
        )
        return False
    except Exception:
        logger.warning(
            "could not write the audit record of %s%s",
            records[0].get("request_id"),
            f" and {len(records) - 1} more" if len(records) > 1 else "",
            exc_info=True,
        )
        return True


# --- Retention -----------------------------------------------------------------------------

# Rows past their retention go in batches of this many, each batch its own transaction:
# a big backlog never holds its locks, or one snapshot that stops VACUUM, for long.
PRUNE_BATCH = 1000

# The ids are picked once, into an array (an InitPlan), and deleted through the primary
# key: joined with a subquery instead, the DELETE was planned as a scan of the whole table
# (seen at 200,000 rows), and `id IN (subquery)` may run the subquery again. SKIP LOCKED
# passes over rows a writer or another pass holds: the next pass takes them. Each batch
# starts where the last one ended (`after`): the index entries of the rows already
# deleted stay until VACUUM, and walking them from the index's start again would make
# each batch cost more than the one before.
_PRUNE_SQL = """
WITH deleted AS (
    DELETE FROM {table} WHERE id = ANY(ARRAY(
        SELECT id FROM {table} WHERE {column} >= %(after)s AND {column} < %(before)s
        ORDER BY {column} LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ))
    RETURNING {column}
)
SELECT count(*), max({column}) FROM deleted
"""


def prune_in_batches(*, sql: str, params: dict[str, Any], deadline: float | None = None) -> int:
    """Run `sql` (delete at most %(limit)s rows whose ordering column is at least
    %(after)s; answer how many and the greatest) again, each run in its own
    transaction, until a run deletes fewer than PRUNE_BATCH rows or the monotonic clock
    passes `deadline`; how many rows in all."""
    deleted = 0
    after: Any = "-infinity"
    while deadline is None or time.monotonic() < deadline:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(sql, {**params, "after": after, "limit": PRUNE_BATCH})
            batch, last = cursor.fetchone()
        deleted += batch
        if batch < PRUNE_BATCH:
            break
        after = last
    return deleted


def audit_records_prune(*, older_than: timedelta, deadline: float | None = None) -> int:
    """Delete the audit records older than `older_than`, in batches (the `at` index)."""
    return prune_in_batches(
        sql=_PRUNE_SQL.format(table=AuditRecord._meta.db_table, column="at"),
        params={"before": timezone.now() - older_than},
        deadline=deadline,
    )


# --- Activity --------------------------------------------------------------------------

# The rows and their NOTIFY in one round trip (PostgreSQL delivers it at commit and
# folds the notifications of one transaction into one).
ACTIVITY_COLUMNS = "at, kind, project_id, job_id, data"
_ACTIVITY_SQL = (
    "WITH rows AS (INSERT INTO omniva_activity ({columns}) VALUES {values})"
    " SELECT pg_notify(%s, '')"
)
_ACTIVITY_VALUES = "(%s, %s, %s, %s, %s::jsonb)"


@dataclass(frozen=True)
class ActivityRow:
    kind: str
    data: dict[str, Any]
    job_id: Any = None
    project_id: Any = None


def activity_record(
    *, kind: str, data: dict[str, Any], job_id: Any = None, project_id: Any = None
) -> None:
    """Write one activity row in the caller's transaction."""
    activity_records([ActivityRow(kind=kind, data=data, job_id=job_id, project_id=project_id)])


def activity_records(rows: list[ActivityRow]) -> None:
    """Write activity rows, in this order, in the caller's transaction: one statement
    with its NOTIFY however many rows."""
    if not rows:
        return
    values, params = activity_values(rows)
    with connection.cursor() as cursor:
        sql = _ACTIVITY_SQL.format(columns=ACTIVITY_COLUMNS, values=values)
        cursor.execute(sql, [*params, ACTIVITY_CHANNEL])


def activity_values(rows: list[ActivityRow]) -> tuple[str, list[Any]]:
    """The VALUES list and parameters of an INSERT of `rows` into omniva_activity
    (columns ACTIVITY_COLUMNS), for a statement that carries other writes too."""
    at = timezone.now()
    params: list[Any] = []
    for row in rows:
        data = json.dumps(row.data, cls=DjangoJSONEncoder)
        params += [at, row.kind, row.project_id, row.job_id, data]
    return ", ".join([_ACTIVITY_VALUES] * len(rows)), params


def activity_prune(*, older_than: timedelta, deadline: float | None = None) -> int:
    """Delete the outbox rows older than `older_than`, in batches (the `at` index)."""
    return prune_in_batches(
        sql=_PRUNE_SQL.format(table=Activity._meta.db_table, column="at"),
        params={"before": timezone.now() - older_than},
        deadline=deadline,
    )


# --- Rate limits ---------------------------------------------------------------------------

# GCRA: a caller may go ahead when its theoretical arrival time (tat) is at most
# `tolerance` in the future; going ahead pushes tat one interval further. Checking and
# spending is one statement, so concurrent requests of one caller on any number of
# nodes cannot both spend the last token: the row lock of ON CONFLICT serializes them.
# GCRA over one row per bucket: `tat` is the theoretical arrival time of the next
# request. Taking `count` requests at once is allowed when the last of them would be.
_TAKE_SQL = """
INSERT INTO omniva_ratelimitbucket AS b (bucket, tat)
VALUES (%(bucket)s, clock_timestamp() + make_interval(secs => %(interval)s * %(count)s))
ON CONFLICT (bucket) DO UPDATE
   SET tat = GREATEST(b.tat, clock_timestamp()) + make_interval(secs => %(interval)s * %(count)s)
 WHERE GREATEST(b.tat, clock_timestamp()) - clock_timestamp()
       + make_interval(secs => %(interval)s * (%(count)s - 1))
       <= make_interval(secs => %(tolerance)s)
RETURNING 1
"""
_WAIT_SQL = """
SELECT EXTRACT(EPOCH FROM (tat - clock_timestamp())) - %(tolerance)s
  FROM omniva_ratelimitbucket WHERE bucket = %(bucket)s
"""


def rate_limit_take(*, bucket: str, rate_per_s: float, burst: int, count: int = 1) -> float | None:
    """Spend `count` requests of `bucket` (all or none). None when allowed, else the
    seconds to wait for one."""
    interval = 1.0 / rate_per_s
    params: dict[str, str | float] = {
        "bucket": bucket,
        "interval": interval,
        "tolerance": interval * (burst - 1),
        "count": max(1, min(count, burst)),
    }
    with connection.cursor() as cursor:
        cursor.execute(_TAKE_SQL, params)
        if cursor.fetchone() is not None:
            return None
        cursor.execute(_WAIT_SQL, params)
        row = cursor.fetchone()
    return max(float(row[0]) if row else interval, 0.001)


# --- The first admin -----------------------------------------------------------------------


def admin_user_ensure(*, username: str, password_file: Path) -> str | None:
    """Create the first superuser if there is no user at all.

    Returns the new password (also written to `password_file`, mode 0600), or None
    when users exist already.
    """
    User = get_user_model()
    with transaction.atomic():
        # Serializes two `serve` processes starting together on one database.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('omniva.admin_user_ensure'))")
        if User.objects.exists():
            return None
        password = secrets.token_urlsafe(18)
        User.objects.create_superuser(username=username, email="", password=password)
    password_file.parent.mkdir(parents=True, exist_ok=True)
    password_file.touch(mode=0o600)
    password_file.write_text(f"{username}\n{password}\n")
    return password
