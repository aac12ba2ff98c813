"""Where content goes: destinations of a project, and one publication per item and
destination.

A Publication is the record that makes publishing idempotent: it is unique per
destination and idempotency key (derived from what is published), so a retried or
re-run stage finds the row it made before; a `published` row is never sent again, and
the key travels to the platform so that an upload whose acknowledgement was lost (the
worker died between the platform's answer and our commit) is recognised there.
"""

from __future__ import annotations

import uuid

from django.db import models

from omniva.models import Clip, Project


class DestinationKind(models.TextChoices):
    WEBHOOK = "webhook"
    DIRECTORY = "directory"
    S3 = "s3"
    PRINTIFY = "printify"
    SHOPIFY = "shopify"


class Destination(models.Model):
    """A place a project publishes to. `config` is shown; `secrets` (tokens, keys) are
    write-only: the API never returns them and the admin masks them."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="destinations")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, choices=DestinationKind.choices)
    config = models.JSONField(default=dict, blank=True)
    secrets = models.JSONField(default=dict, blank=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"


class PublicationStatus(models.TextChoices):
    """pending: recorded, not sent yet; publishing: an attempt is sending it (or died
    while it did); published: the platform has it (final); failed: the last attempt
    failed (the stage retries with backoff, with the same key)."""

    PENDING = "pending"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    FAILED = "failed"


class Publication(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    destination = models.ForeignKey(
        Destination, on_delete=models.CASCADE, related_name="publications"
    )
    clip = models.ForeignKey(
        Clip, null=True, blank=True, on_delete=models.SET_NULL, related_name="publications"
    )
    # A file under the media root, for what is not a clip (a design, a report).
    artifact = models.CharField(max_length=1024, blank=True, default="")
    # What the platform needs besides the clip or file: a design's title, description,
    # product type, tags, price (pod_design).
    payload = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=64)
    status = models.CharField(
        max_length=20, choices=PublicationStatus.choices, default=PublicationStatus.PENDING
    )
    external_id = models.CharField(max_length=500, blank=True, default="")
    url = models.CharField(max_length=2048, blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    error = models.JSONField(null=True, blank=True)
    published_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["destination", "idempotency_key"], name="publishing_one_per_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.idempotency_key[:12]} -> {self.destination_id} ({self.status})"
