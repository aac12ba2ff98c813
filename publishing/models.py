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
from typing import Any

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


class Schedule(models.Model):
    """A pipeline run again and again with the same params: by a cron expression or
    every `interval_s` seconds (whole minutes, django-q2's resolution).

    The timing is django-q2's scheduler (`q_schedule`, kept in step by the services): a
    qcluster's guard looks at due schedules about every 30 s and queues
    publishing.tasks.schedule_fire, which submits the job with an idempotency key made
    of the schedule and the run's intended time, so one run never makes two jobs.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="schedules")
    name = models.CharField(max_length=200, blank=True, default="")
    pipeline = models.CharField(max_length=100)
    params = models.JSONField(default=dict, blank=True)
    priority = models.PositiveSmallIntegerField(default=5)
    cron = models.CharField(max_length=100, blank=True, default="")
    interval_s = models.PositiveIntegerField(null=True, blank=True)
    active = models.BooleanField(default=True)
    q_schedule = models.OneToOneField(
        "django_q.Schedule", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    runs = models.PositiveIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_job_id = models.UUIDField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "created_at"]
        constraints = [
            models.CheckConstraint(
                condition=(models.Q(cron="") & models.Q(interval_s__isnull=False))
                | (~models.Q(cron="") & models.Q(interval_s__isnull=True)),
                name="publishing_schedule_cron_or_interval",
            )
        ]

    def __str__(self) -> str:
        return self.name or f"{self.pipeline} ({self.cron or f'every {self.interval_s} s'})"

    @property
    def next_run_at(self) -> Any:
        return self.q_schedule.next_run if self.q_schedule and self.active else None
