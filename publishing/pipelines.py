"""The pipelines that publish, registered with the jobs registry (DESIGN.md: publishing
imports jobs, never the other way).

`publish`: a clip to every active destination of its project (or the ones named). A
destination that fails fails the attempt with UPLOAD_FAILED, after the others were
tried; the retry (with backoff) publishes only what is not published yet.
"""

from __future__ import annotations

from typing import Any

from jobs.pipelines import Pipeline, Stage, register
from jobs.stages import StageContext, StageError
from omniva.errors import OmnivaError
from omniva.models import Clip
from publishing import services
from publishing.models import Destination


def publish_clip(ctx: StageContext) -> dict[str, Any]:
    clip = Clip.objects.filter(pk=ctx.params["clip_id"]).first()
    if clip is None:
        raise StageError("CLIP_NOT_FOUND", "No such clip.", retryable=False)
    destinations = Destination.objects.filter(project=clip.project_id, active=True)
    if ctx.params.get("destinations"):
        destinations = destinations.filter(pk__in=ctx.params["destinations"])
    published, failed = [], []
    for destination in destinations.order_by("name"):
        publication = services.publication_record(destination=destination, clip=clip)
        try:
            publication = services.publication_publish(publication_id=publication.pk)
        except OmnivaError as exc:
            failed.append(exc.message)
            ctx.log(exc.message, level="warning")
            continue
        published.append(
            {
                "destination": str(destination.pk),
                "publication": str(publication.pk),
                "external_id": publication.external_id,
                "url": publication.url,
            }
        )
    if failed:
        raise StageError("UPLOAD_FAILED", "; ".join(failed), retryable=True)
    return {"clip_id": str(clip.pk), "publications": published}


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
