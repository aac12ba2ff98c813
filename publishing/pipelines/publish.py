"""The pipelines that publish, registered with the jobs registry (DESIGN.md: publishing
imports jobs, never the other way).

`publish`: a clip to every active destination of its project (or the ones named). A
destination that fails fails the attempt with UPLOAD_FAILED, after the others were
tried; the retry (with backoff) publishes only what is not published yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db.models import QuerySet

from jobs.pipelines.context import StageContext, StageError
from jobs.pipelines.registry import Pipeline, Stage, register
from omniva.models import Clip
from publishing import services
from publishing.models import Destination, Publication


@dataclass
class PublishingOutcome:
    """What publishing items to destinations came to: a row per publication made, and
    the messages of those that failed. A failure fails the stage with UPLOAD_FAILED
    after every other item was tried; the retry (with backoff) sends only what is
    missing, unless no failure could pass with a retry (a wrong token)."""

    publications: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    retry_helps: bool = False

    def publish(
        self,
        *,
        destination: Destination,
        log: Callable[..., None],
        clip: Clip | None = None,
        artifact: str = "",
        payload: dict[str, Any] | None = None,
    ) -> Publication | None:
        """One item to one destination through its publication (sent at most once)."""
        publication = services.publication_record(
            destination=destination, clip=clip, artifact=artifact, payload=payload
        )
        try:
            return services.publication_publish(publication_id=publication.pk)
        except services.PublicationFailed as exc:
            self.failures.append(exc.message)
            self.retry_helps = self.retry_helps or exc.transient
            log(exc.message, level="warning")
            return None

    def raise_if_failed(self) -> None:
        if self.failures:
            raise StageError("UPLOAD_FAILED", "; ".join(self.failures), retryable=self.retry_helps)


def clip_publish_everywhere(
    *,
    clip: Clip,
    destinations: QuerySet[Destination],
    log: Callable[..., None],
    outcome: PublishingOutcome,
) -> bool:
    """Publish `clip` to each of `destinations` (by name); whether all of them have it."""
    failed_before = len(outcome.failures)
    for destination in destinations.order_by("name"):
        publication = outcome.publish(destination=destination, clip=clip, log=log)
        if publication is not None:
            outcome.publications.append(
                {
                    "clip_id": str(clip.pk),
                    "destination": str(destination.pk),
                    "publication": str(publication.pk),
                    "external_id": publication.external_id,
                    "url": publication.url,
                }
            )
    return len(outcome.failures) == failed_before


def publish_clip(ctx: StageContext) -> dict[str, Any]:
    clip = Clip.objects.filter(pk=ctx.params["clip_id"]).first()
    if clip is None:
        raise StageError("CLIP_NOT_FOUND", "No such clip.", retryable=False)
    destinations = Destination.objects.filter(project=clip.project_id, active=True)
    if ctx.params.get("destinations"):
        destinations = destinations.filter(pk__in=ctx.params["destinations"])
    outcome = PublishingOutcome()
    clip_publish_everywhere(clip=clip, destinations=destinations, log=ctx.log, outcome=outcome)
    outcome.raise_if_failed()
    return {"clip_id": str(clip.pk), "publications": outcome.publications}


PUBLISH = register(
    Pipeline(
        name="publish",
        description="Publish a clip to every active destination of its project (or the "
        "`destinations` named); idempotent, retried with backoff.",
        stages=(Stage("publish", publish_clip),),
        params_schema={
            "type": "object",
            "properties": {
                "clip_id": {"type": "string", "format": "uuid"},
                "destinations": {
                    "type": "array",
                    "items": {"type": "string", "format": "uuid"},
                    "maxItems": 100,
                },
            },
            "required": ["clip_id"],
            "additionalProperties": False,
        },
    )
)
