"""The core models: projects, API keys, the audit trail, rate-limit buckets, the
activity outbox, and the content of a project (creators and their clips).
"""

from __future__ import annotations

import hashlib
import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.utils import timezone
from pgvector.django import HnswIndex, VectorField

# The NOTIFY channel of the live stream: every activity row's transaction notifies it
# (omniva/services.py activity_record, omniva/live.py listens).
ACTIVITY_CHANNEL = "omniva_activity"


class Project(models.Model):
    """A tenant boundary: an API key bound to a project sees that project only."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Scope(models.TextChoices):
    JOBS_READ = "jobs:read", "Read jobs and pipelines"
    JOBS_WRITE = "jobs:write", "Submit, cancel, retry and delete jobs"
    ENGINES = "engines", "Register engines and process events"
    CONTENT = "content", "Manage projects, creators, clips and publishing"
    ADMIN = "admin", "Everything, including audit records"


# A key's secret is `omv_<prefix>_<random>`; only its SHA-256 is stored (api_key_hash).
KEY_PREFIX = "omv"


def api_key_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiKey(models.Model):
    """A secret for automation. Only a SHA-256 of the key is stored.

    The key reads `omv_<prefix>_<secret>`; the prefix is stored in clear to find the
    row with an index, the hash is compared in constant time. Keys are 256-bit random
    strings, so a fast hash is enough: there is nothing to brute-force.
    """

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    scopes = ArrayField(models.CharField(max_length=20, choices=Scope.choices), default=list)
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.CASCADE, related_name="api_keys"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return self.name

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def has_scope(self, scope: str) -> bool:
        return Scope.ADMIN in self.scopes or scope in self.scopes


class AuditRecord(models.Model):
    """One row for every request under /v1, written after the response is sent."""

    request_id = models.CharField(max_length=128, db_index=True)
    at = models.DateTimeField(db_index=True)
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit_records"
    )
    # The key's name at the time, kept when the key is later deleted.
    key_name = models.CharField(max_length=100, blank=True, default="")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    method = models.CharField(max_length=10)
    path = models.CharField(max_length=2000)
    status = models.PositiveSmallIntegerField(db_index=True)
    duration_ms = models.FloatField()
    remote_addr = models.GenericIPAddressField(null=True, blank=True)
    entity_ids = ArrayField(models.CharField(max_length=64), default=list, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["path", "-at"], name="audit_path_at")]

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.status}"


class RateLimitBucket(models.Model):
    """GCRA state of one caller: the theoretical arrival time of its next request.

    A leaky bucket expressed as a single timestamp, so one UPSERT both checks and
    spends the allowance (see services.rate_limit_take).
    """

    bucket = models.CharField(max_length=100, primary_key=True)
    tat = models.DateTimeField()

    def __str__(self) -> str:
        return self.bucket


class Activity(models.Model):
    """The outbox of live events (DESIGN.md, decision 3): one row per state change of a
    job, stage, engine or event, written by the service that made the change, in its
    transaction, and NOTIFYs `omniva_activity` (delivered at commit). The id is the
    stream's cursor. Ids are taken at insert and transactions commit in their own
    order, so a row with a smaller id can become visible after a larger one: a reader
    must not move its cursor past ids that may still commit.

    `kind` is seed 001's event name where there is one (`job:update`, `job:progress`,
    `log`), else `stage:update`, `engine:update`, `event:update`. `project_id` scopes the
    row for project-bound keys (none: visible to unbound keys only).
    """

    id = models.BigAutoField(primary_key=True)
    at = models.DateTimeField(default=timezone.now, db_index=True)
    kind = models.CharField(max_length=40)
    project_id = models.UUIDField(null=True, blank=True)
    job_id = models.UUIDField(null=True, blank=True)
    data = models.JSONField(default=dict)

    class Meta:
        indexes = [
            models.Index(fields=["job_id", "id"], name="omniva_activity_job"),
            models.Index(fields=["project_id", "id"], name="omniva_activity_project"),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.kind}"


# --- content (seed 002) ------------------------------------------------------------------

# The clip embedding's size (all-MiniLM-L6-v2, jobs/pipelines/lib/inference.py).
CLIP_EMBEDDING_DIM = 384


class Creator(models.Model):
    """A source of clips in a project: a channel, a feed, a folder."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="creators")
    name = models.CharField(max_length=200)
    handle = models.CharField(max_length=200, blank=True, default="")
    platform = models.CharField(max_length=50, blank=True, default="")
    source_url = models.CharField(max_length=2048, blank=True, default="")
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ClipStatus(models.TextChoices):
    """Where a clip is in the clipfarm lifecycle (seed 002)."""

    INGESTED = "ingested"
    ANALYZED = "analyzed"
    EDITED = "edited"
    PUBLISHED = "published"
    FAILED = "failed"


class Clip(models.Model):
    """A piece of media of a project. `embedding` is the vector of its title and
    transcript (made on the gpu queue whenever they change; `embedded_text` is the hash
    of the text it was made from), searched by cosine distance through an HNSW index."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="clips")
    creator = models.ForeignKey(
        Creator, null=True, blank=True, on_delete=models.SET_NULL, related_name="clips"
    )
    title = models.CharField(max_length=500, blank=True, default="")
    source_url = models.CharField(max_length=2048, blank=True, default="")
    media_url = models.CharField(max_length=2048, blank=True, default="")
    duration_s = models.FloatField(null=True, blank=True)
    transcript = models.TextField(blank=True, default="")
    status = models.CharField(
        max_length=20, choices=ClipStatus.choices, default=ClipStatus.INGESTED
    )
    analysis = models.JSONField(default=dict, blank=True)
    embedding = VectorField(dimensions=CLIP_EMBEDDING_DIM, null=True, blank=True)
    embedded_text = models.CharField(max_length=64, blank=True, default="")
    embedded_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # A source is ingested once per project (clipfarm skips what it has).
            models.UniqueConstraint(
                fields=["project", "source_url"],
                condition=~models.Q(source_url=""),
                name="omniva_clip_one_per_source",
            )
        ]
        indexes = [
            HnswIndex(
                name="omniva_clip_embedding_cosine",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
            )
        ]

    def __str__(self) -> str:
        return self.title or str(self.pk)

    def text_for_embedding(self) -> str:
        return "\n".join(part for part in (self.title.strip(), self.transcript.strip()) if part)
