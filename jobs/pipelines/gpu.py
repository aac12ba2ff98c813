"""The pipelines of the gpu queue: `embed_texts` and `image_upscale` (seed 003's
image_super_resolution_pipeline).

`embed` batches across jobs (jobs/pipelines/lib/inference.py): the gpu worker runs the texts
of every ready `embed` attempt in one forward pass and hands each job its own vectors.
`image_upscale` is fetch → classify_image → upscale → store. The fetched input and the
upscaled output are files under the job's media folder (removed with the job); stage
outputs carry their paths, never the bytes. Bad input (not an image, too large, an
unreachable or private URL, no texts) fails the job with its code and is not retried;
only transient errors (timeouts, 5xx) are. A private `output_url` is refused by `fetch`,
before any work.

torch is imported inside the stage functions (with jobs/pipelines/lib/imaging.py):
registering these pipelines does not load it into a web process.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from pathlib import Path
from typing import Any

from django.conf import settings

from jobs.pipelines.context import StageContext, StageError
from jobs.pipelines.lib.inference import EMBED_DIM, EMBED_MODEL, models
from jobs.pipelines.registry import Dag, Pipeline, Stage, register
from jobs.services import job_files
from omniva import outbound
from omniva.images import encode_png
from omniva.media import artifact_save, job_artifact_name, media_name, media_reference
from omniva.models import Clip
from omniva.services import clip_embedding_store, sha256_hex

EMBED_TEXTS_MAX = 1000
EMBED_TEXT_MAX_CHARS = 10_000
# The upscaled picture may have at most this many times OMNIVA_IMAGE_MAX_PIXELS.
UPSCALE_OUTPUT_FACTOR = 4
INPUT_FILE = "input"


# --- embed_texts ------------------------------------------------------------------------


def _texts_of(ctx: StageContext) -> list[str]:
    texts = ctx.params.get("texts")
    if not isinstance(texts, list) or not texts:
        raise StageError("EMPTY_INPUT", "`texts` must be a non-empty list.", retryable=False)
    if not all(isinstance(text, str) for text in texts):
        raise StageError("INVALID_INPUT", "Every text must be a string.", retryable=False)
    return texts


def embed_many(contexts: list[StageContext]) -> list[Any]:
    """Every context's texts in one `encode` call (forward passes of the max batch);
    one output, or the StageError of bad input, per context."""
    outcomes: list[Any] = []
    texts: list[str] = []
    spans: list[tuple[int, int] | None] = []
    for ctx in contexts:
        try:
            own = _texts_of(ctx)
        except StageError as exc:
            outcomes.append(exc)
            spans.append(None)
            continue
        outcomes.append(None)
        spans.append((len(texts), len(texts) + len(own)))
        texts.extend(own)
    vectors = models.embed(texts) if texts else []
    for index, span in enumerate(spans):
        if span is not None:
            outcomes[index] = {
                "model": EMBED_MODEL,
                "dim": EMBED_DIM,
                "vectors": vectors[span[0] : span[1]],
            }
    return outcomes


EMBED_TEXTS = register(
    Pipeline(
        name="embed_texts",
        description="Normalized 384-d vectors of `texts` (all-MiniLM-L6-v2 on the gpu "
        "queue, batched across jobs).",
        stages=(Stage("embed", queue="gpu", batch=embed_many),),
        params_schema={
            "type": "object",
            "properties": {
                "texts": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": EMBED_TEXTS_MAX,
                    "items": {"type": "string", "maxLength": EMBED_TEXT_MAX_CHARS},
                }
            },
            "required": ["texts"],
            "additionalProperties": False,
        },
    )
)


# --- clip_embed -------------------------------------------------------------------------


class ClipEmbedding(StrEnum):
    """What `clips_embed` did with one clip."""

    STORED = "stored"  # embedded now
    CURRENT = "current"  # its vector already is of its title and transcript: not redone
    CHANGED = "changed"  # its text changed meanwhile: the job of the new text stores that
    EMPTY = "empty"  # no title nor transcript: nothing to embed
    MISSING = "missing"  # no such clip (deleted)


def clips_embed(clip_ids: list[str]) -> dict[str, str]:
    """Embed the titles and transcripts of the clips whose stored vector is not of their
    current text, in one `encode` call, each stored on its clip unless its text changed
    meanwhile; what was done with each id (ClipEmbedding)."""
    canonical = {clip_id: _canonical_uuid(clip_id) for clip_id in clip_ids}
    outcomes = dict.fromkeys(canonical.values(), ClipEmbedding.MISSING)
    texts: dict[str, str] = {}
    for clip in Clip.objects.filter(pk__in=[i for i in outcomes if i]).only(
        "pk", "title", "transcript", "embedded_text"
    ):
        text = clip.text_for_embedding()
        if not text:
            outcomes[str(clip.pk)] = ClipEmbedding.EMPTY
        elif clip.embedded_text == sha256_hex(text):
            outcomes[str(clip.pk)] = ClipEmbedding.CURRENT
        else:
            texts[str(clip.pk)] = text
    if texts:
        vectors = models.embed(list(texts.values()))
        for (clip_id, text), vector in zip(texts.items(), vectors, strict=True):
            stored = clip_embedding_store(clip_id=clip_id, text=text, vector=vector)
            outcomes[clip_id] = ClipEmbedding.STORED if stored else ClipEmbedding.CHANGED
    return {clip_id: outcomes[canonical[clip_id]] for clip_id in clip_ids}


def clip_embed_many(contexts: list[StageContext]) -> list[Any]:
    """The vectors of the clips' titles and transcripts, in one forward pass, each stored
    on its clip unless its text changed meanwhile (a newer job stores that one) or its
    vector already is of this text (clipfarm's `embed` stage made it first)."""
    ids = [str(ctx.params.get("clip_id")) for ctx in contexts]
    outcomes = clips_embed(ids)
    return [
        {
            "clip_id": clip_id,
            "dim": EMBED_DIM,
            "stored": outcomes[clip_id] == ClipEmbedding.STORED,
            "outcome": outcomes[clip_id],
        }
        for clip_id in ids
    ]


def _canonical_uuid(value: str) -> str:
    """The UUID's usual spelling, or "" when `value` is not one."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return ""


CLIP_EMBED = register(
    Pipeline(
        name="clip_embed",
        description="Embed a clip's title and transcript for semantic search (queued by "
        "every change of them; batched across jobs on the gpu queue).",
        stages=(Stage("embed", queue="gpu", batch=clip_embed_many),),
        params_schema={
            "type": "object",
            "properties": {"clip_id": {"type": "string", "format": "uuid"}},
            "required": ["clip_id"],
            "additionalProperties": False,
        },
    )
)


# --- image_upscale ----------------------------------------------------------------------


def _outbound_failure(exc: outbound.OutboundError) -> StageError:
    return StageError(exc.code, exc.message, retryable=exc.transient)


def read_input(source: str) -> bytes:
    """The bytes of a user-given input: an http(s) URL through outbound, or a media file
    (its name or `/media/…` address); bad or private ones fail with their code."""
    if source.startswith(("http://", "https://")):
        try:
            return outbound.fetch(
                source,
                max_bytes=settings.OMNIVA_FETCH_MAX_BYTES,
                timeout_s=settings.OMNIVA_FETCH_TIMEOUT_S,
            ).body
        except outbound.OutboundError as exc:
            raise _outbound_failure(exc) from exc
    if "://" in source:
        raise StageError(
            "URL_NOT_ALLOWED", "The input must be an http(s) URL or a media file.", retryable=False
        )
    try:
        path = outbound.media_path(media_name(source))
    except outbound.OutboundError as exc:
        raise _outbound_failure(exc) from exc
    if path.stat().st_size > settings.OMNIVA_FETCH_MAX_BYTES:
        raise StageError(
            "FETCH_TOO_LARGE",
            f"The file is larger than {settings.OMNIVA_FETCH_MAX_BYTES} bytes.",
            retryable=False,
        )
    return path.read_bytes()


def _job_folder(ctx: StageContext) -> Path:
    folder = job_files(ctx.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _decode(data: bytes) -> Any:
    from jobs.pipelines.lib.imaging import decode_image  # torch: only a gpu worker loads it

    return decode_image(data, max_pixels=settings.OMNIVA_IMAGE_MAX_PIXELS)


def _check_output_url(ctx: StageContext) -> None:
    """A refused `output_url` fails the job before the input is fetched and upscaled:
    otherwise the work would be done, and its picture left in the job's folder, for a
    PUT that can never be sent. `store` checks again when it sends (DNS may answer
    otherwise by then, and a redirect is only known then); a name that does not
    resolve now is left to it as well."""
    output_url = ctx.params.get("output_url")
    if not output_url:
        return
    try:
        outbound.check(str(output_url))
    except outbound.OutboundError as exc:
        if exc.code == outbound.OutboundCode.URL_NOT_ALLOWED:
            raise _outbound_failure(exc) from exc


def fetch(ctx: StageContext) -> dict[str, Any]:
    """The input's bytes, checked to be an image within the limits, kept as a file."""
    _check_output_url(ctx)
    data = read_input(str(ctx.params["input_url"]))
    image = _decode(data)
    path = _job_folder(ctx) / INPUT_FILE
    path.write_bytes(data)
    return {
        "path": str(path.relative_to(settings.MEDIA_ROOT)),
        "bytes": len(data),
        "width": image.width,
        "height": image.height,
    }


def _fetched(ctx: StageContext) -> Any:
    return _decode((Path(settings.MEDIA_ROOT) / ctx.inputs["fetch"]["path"]).read_bytes())


def classify(ctx: StageContext) -> dict[str, Any]:
    from jobs.pipelines.lib.imaging import classify_image  # torch: only a gpu worker loads it

    return classify_image(_fetched(ctx))


def upscale(ctx: StageContext) -> dict[str, Any]:
    """Bicubic resampling and an unsharp mask on the gpu worker's device, tiled."""
    # torch: only a gpu worker loads it
    from jobs.pipelines.lib.imaging import UPSCALE_METHOD
    from jobs.pipelines.lib.imaging import upscale as upscale_image

    scale = int(ctx.params.get("scale", 2))
    image = _fetched(ctx)
    limit = settings.OMNIVA_IMAGE_MAX_PIXELS * UPSCALE_OUTPUT_FACTOR
    if image.width * image.height * scale * scale > limit:
        raise StageError(
            "IMAGE_TOO_LARGE",
            f"Upscaled {scale}x the image would have more than {limit} pixels.",
            retryable=False,
        )
    started = time.monotonic()
    result = upscale_image(
        image,
        scale=scale,
        device=models.device,
        tile=settings.OMNIVA_UPSCALE_TILE,
        half=models.half,
    )
    elapsed = time.monotonic() - started
    models.record("upscale_megapixels", result.width * result.height / 1e6, elapsed)
    path = _job_folder(ctx) / f"upscaled_x{scale}.png"
    path.write_bytes(encode_png(result))
    return {
        "path": str(path.relative_to(settings.MEDIA_ROOT)),
        "width": result.width,
        "height": result.height,
        "scale": scale,
        "method": UPSCALE_METHOD,
        "device": str(models.device),
        "ms": round(elapsed * 1000),
    }


def store(ctx: StageContext) -> dict[str, Any]:
    """PUT the picture to `output_url` when one is given, else serve it from the media
    root (its URL path)."""
    relative = ctx.inputs["upscale"]["path"]
    output_url = ctx.params.get("output_url")
    if output_url:
        try:
            outbound.send(
                "PUT",
                str(output_url),
                body=(Path(settings.MEDIA_ROOT) / relative).read_bytes(),
                content_type="image/png",
                timeout_s=settings.OMNIVA_FETCH_TIMEOUT_S,
            )
        except outbound.OutboundError as exc:
            raise _outbound_failure(exc) from exc
    else:
        path = Path(settings.MEDIA_ROOT) / relative
        output_url = media_reference(artifact_save(job_artifact_name(ctx.job_id, path.name), path))
    return {"input_url": ctx.params["input_url"], "output_url": output_url}


def upscale_result(outputs: dict[str, Any], dag: Dag) -> dict[str, Any]:
    upscaled = outputs["upscale"]
    return {
        **outputs["store"],
        "classification": outputs["classify_image"],
        "upscale": {key: upscaled[key] for key in ("scale", "width", "height", "method", "device")},
    }


IMAGE_UPSCALE = register(
    Pipeline(
        name="image_upscale",
        description="Fetch an image (http(s) URL or media file), classify it, upscale it 2x "
        "or 4x on the gpu worker (bicubic + unsharp mask, not a learned model), store it.",
        stages=(
            Stage("fetch", fetch, queue="gpu"),
            Stage("classify_image", classify, depends_on=("fetch",), queue="gpu"),
            Stage("upscale", upscale, depends_on=("fetch",), queue="gpu"),
            Stage("store", store, depends_on=("upscale", "classify_image"), queue="gpu"),
        ),
        result=upscale_result,
        params_schema={
            "type": "object",
            "properties": {
                "input_url": {"type": "string", "minLength": 1, "maxLength": 2048},
                "output_url": {"type": "string", "minLength": 1, "maxLength": 2048},
                "scale": {"enum": [2, 4]},
            },
            "required": ["input_url"],
            "additionalProperties": False,
        },
    )
)
