"""`pod_design` (seed 001): print-on-demand designs from a prompt, with product mockups.

Stages (count = `count`, 1 by default):

    prompt -> generate_0 .. generate_<count-1> -> mockups -> publish

- `prompt` (default queue): the text and seed of each design: `params.prompt`, or one
  built from theme, style and niche; with count > 1 every design gets its own seed
  (and a built prompt its own composition), so no two ask for the same picture.
- `generate_<i>`: an `image_generation` engine (engines/sdk/image_generation.py: procedural
  Pillow art, or ComfyUI) draws design i and sends it back as a base64 PNG.
- `mockups` (default queue): each image is checked (a PNG, within the size limits),
  stored as the print file, and composited on a t-shirt and/or hoodie silhouette drawn
  with Pillow; every file is an artifact of the job (`jobs/<job id>/…`).
- `publish` (default queue): with `autoPublish`, every product to every active
  destination of the job's project: the publication's file is the product's mockup,
  its payload `{title, description, product_type, tags, price, design}` (`design`: the
  print file's artifact name). A failed publication fails the attempt with
  UPLOAD_FAILED after the others were tried, and the retry (with backoff) sends only
  what is not published yet (publications are unique per destination and artifact).
  What cannot be published at all (no project, no destination) is in `errors`.

The result has seed 001's shape: `success`, `generatedImages` [{id, url, prompt}],
`products` [{platform, productId, url, type}], `errors`, `totalTime` (ms), plus
`mockups`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

from django.utils import timezone
from PIL import Image, ImageDraw

from engines.sdk.image_generation import DEFAULT_EDGE
from engines.sdk.image_generation import EVENT_TYPE as IMAGE_GENERATION
from jobs.models import Job
from jobs.pipelines.context import StageContext, StageError
from jobs.pipelines.registry import Dag, Pipeline, Stage, register
from omniva.images import MAX_EDGE, ImageCheckError, encode_png, open_png
from omniva.media import artifact_save, job_artifact_name, media_reference
from publishing.models import Destination
from publishing.pipelines.publish import PublishingOutcome

PRODUCT_TYPES = ("tshirt", "hoodie")
MAX_COUNT = 10
DEFAULT_PRICES = {"tshirt": 24.99, "hoodie": 44.99}
PRODUCT_NAMES = {"tshirt": "T-Shirt", "hoodie": "Hoodie"}
TITLE_MAX_CHARS = 120
# A base64 PNG of the largest design: its raw pixels at 4 bytes each, with room to spare.
IMAGE_BASE64_MAX_CHARS = 4 * (MAX_EDGE * MAX_EDGE * 4) // 3 + 1024
# Built prompts of a batch differ by their composition, so each design is its own.
COMPOSITIONS = (
    "centered emblem",
    "bold poster layout",
    "circular badge",
    "dynamic diagonal composition",
    "symmetrical pattern",
    "minimal silhouette",
    "layered collage",
    "retro sunset frame",
    "geometric mosaic",
    "hand-drawn sticker style",
)
PRINT_READY = "print-ready artwork, clean background, high contrast, no text"


def generate_stage(index: int) -> str:
    return f"generate_{index}"


# --- prompt ------------------------------------------------------------------------------


def _text(params: Any, name: str) -> str:
    value = params.get(name)
    return value.strip() if isinstance(value, str) else ""


def built_prompt(theme: str, style: str, niche: str) -> str:
    """A design prompt from the seed's theme, style and niche (any of them may be empty)."""
    subject = " ".join(part for part in (style, theme) if part) or "graphic"
    audience = f" for {niche} fans" if niche else ""
    return f"A {subject} design{audience}"


def _base_seed(ctx: StageContext) -> int:
    """`params.seed`, else one derived from the job id: a retried stage asks again for
    the same pictures."""
    if isinstance(ctx.params.get("seed"), int):
        return int(ctx.params["seed"])
    return int.from_bytes(hashlib.sha256(str(ctx.job_id).encode()).digest()[:4], "big")


def prompts(ctx: StageContext) -> dict[str, Any]:
    """One image request per generate stage (engines/sdk/image_generation.py reads
    `requests[<stage>]`)."""
    params = ctx.params
    count = int(params.get("count", 1))
    given = _text(params, "prompt")
    theme, style, niche = (_text(params, name) for name in ("theme", "style", "niche"))
    if not (given or theme or style or niche):
        raise StageError(
            "INVALID_INPUT",
            "Give a prompt, or at least one of theme, style and niche.",
            retryable=False,
        )
    base_seed = _base_seed(ctx)
    width = int(params.get("width", DEFAULT_EDGE))
    height = int(params.get("height", DEFAULT_EDGE))
    requests = {}
    for index in range(count):
        if given:
            text = given
        else:
            composition = f", {COMPOSITIONS[index % len(COMPOSITIONS)]}" if count > 1 else ""
            text = f"{built_prompt(theme, style, niche)}{composition}, {PRINT_READY}"
        requests[generate_stage(index)] = {
            "index": index,
            "prompt": text,
            "seed": (base_seed + index) % 2**32,
            "width": width,
            "height": height,
        }
    return {"requests": requests}


# --- mockups -----------------------------------------------------------------------------

MOCKUP_SIZE = 800
BACKGROUND = (246, 246, 248)
GARMENT_COLORS = {"tshirt": (38, 42, 52), "hoodie": (44, 62, 104)}
# Drawn at twice the size and scaled down: Pillow's polygons have no anti-aliasing.
SUPERSAMPLE = 2


@dataclass(frozen=True)
class Garment:
    """A silhouette on a MOCKUP_SIZE canvas, in fractions of its side."""

    body: tuple[tuple[float, float], ...]
    neck: tuple[float, float, float, float]  # the ellipse cut out of the body
    print_area: tuple[float, float, float, float]  # where the design goes (fits inside)
    hood: tuple[float, float, float, float] | None = None
    pocket: tuple[tuple[float, float], ...] = ()


GARMENTS = {
    "tshirt": Garment(
        body=(
            (0.41, 0.14),
            (0.29, 0.17),
            (0.13, 0.31),
            (0.21, 0.41),
            (0.30, 0.35),
            (0.30, 0.90),
            (0.70, 0.90),
            (0.70, 0.35),
            (0.79, 0.41),
            (0.87, 0.31),
            (0.71, 0.17),
            (0.59, 0.14),
        ),
        neck=(0.40, 0.08, 0.60, 0.20),
        print_area=(0.35, 0.29, 0.65, 0.62),
    ),
    "hoodie": Garment(
        body=(
            (0.40, 0.17),
            (0.27, 0.20),
            (0.14, 0.78),
            (0.23, 0.81),
            (0.31, 0.40),
            (0.30, 0.92),
            (0.70, 0.92),
            (0.69, 0.40),
            (0.77, 0.81),
            (0.86, 0.78),
            (0.73, 0.20),
            (0.60, 0.17),
        ),
        neck=(0.42, 0.12, 0.58, 0.24),
        hood=(0.35, 0.04, 0.65, 0.28),
        pocket=((0.37, 0.68), (0.63, 0.68), (0.67, 0.84), (0.33, 0.84)),
        print_area=(0.36, 0.30, 0.64, 0.63),
    ),
}


def _darker(color: tuple[int, int, int], factor: float = 0.75) -> tuple[int, int, int]:
    r, g, b = color
    return (int(r * factor), int(g * factor), int(b * factor))


def _garment_canvas(product_type: str) -> Image.Image:
    garment = GARMENTS[product_type]
    color = GARMENT_COLORS[product_type]
    side = MOCKUP_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def box(fractions: tuple[float, ...]) -> list[float]:
        return [value * side for value in fractions]

    if garment.hood:
        draw.ellipse(box(garment.hood), fill=_darker(color, 0.9))
    draw.polygon([(x * side, y * side) for x, y in garment.body], fill=color)
    draw.ellipse(box(garment.neck), fill=_darker(color, 0.55) if garment.hood else BACKGROUND)
    if garment.pocket:
        points = [(x * side, y * side) for x, y in garment.pocket]
        draw.polygon(points, outline=_darker(color), width=3 * SUPERSAMPLE)
    return canvas.resize((MOCKUP_SIZE, MOCKUP_SIZE), Image.Resampling.LANCZOS)


def mockup(design: Image.Image, product_type: str) -> tuple[Image.Image, list[int]]:
    """The design on a `product_type` silhouette, and the box [x0, y0, x1, y1] it covers
    (scaled to fit the print area, centred, aspect kept)."""
    canvas = _garment_canvas(product_type)
    x0, y0, x1, y1 = (round(v * MOCKUP_SIZE) for v in GARMENTS[product_type].print_area)
    scale = min((x1 - x0) / design.width, (y1 - y0) / design.height)
    width, height = max(1, round(design.width * scale)), max(1, round(design.height * scale))
    left, top = x0 + (x1 - x0 - width) // 2, y0 + (y1 - y0 - height) // 2
    canvas.paste(
        design.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), (left, top)
    )
    return canvas, [left, top, left + width, top + height]


def _design_image(index: int, output: Any) -> tuple[bytes, Image.Image]:
    def bad(code: str, message: str) -> StageError:
        return StageError(code, f"Design {index}: {message}", retryable=False)

    encoded = output.get("image_png_base64") if isinstance(output, dict) else None
    if not isinstance(encoded, str) or not encoded:
        raise bad("INVALID_IMAGE", "the engine sent no image_png_base64.")
    if len(encoded) > IMAGE_BASE64_MAX_CHARS:
        raise bad("IMAGE_TOO_LARGE", f"the image is over {IMAGE_BASE64_MAX_CHARS} base64 chars.")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad("INVALID_IMAGE", "the image is not valid base64.") from exc
    try:
        return data, open_png(data, max_edge=MAX_EDGE)
    except ImageCheckError as exc:
        raise bad(exc.code, f"{exc.message}.") from exc


def mockups(ctx: StageContext) -> dict[str, Any]:
    """Store each design and its mockups as the job's artifacts."""
    product_types = list(ctx.params["productTypes"])
    requests = ctx.inputs["prompt"]["requests"]
    designs, made = [], []
    count = len(requests)
    for index in range(count):
        output = ctx.inputs[generate_stage(index)]
        data, image = _design_image(index, output)
        design_name = artifact_save(job_artifact_name(ctx.job_id, f"design_{index}.png"), data)
        designs.append(
            {
                "index": index,
                "id": f"img_{str(ctx.job_id).replace('-', '')[:12]}_{index}",
                "artifact": design_name,
                "prompt": requests[generate_stage(index)]["prompt"],
                "seed": output.get("seed"),
                "width": image.width,
                "height": image.height,
                "generator": output.get("generator"),
            }
        )
        for product_type in product_types:
            picture, print_box = mockup(image, product_type)
            name = artifact_save(
                job_artifact_name(ctx.job_id, f"mockup_{index}_{product_type}.png"),
                encode_png(picture),
            )
            made.append(
                {"design": index, "type": product_type, "artifact": name, "print_box": print_box}
            )
        ctx.progress(100.0 * (index + 1) / count, f"design {index}: {len(product_types)} mockups")
    return {"designs": designs, "mockups": made}


# --- publish -----------------------------------------------------------------------------


def _title(prompt: str, product_type: str) -> str:
    """The prompt's first clause and the product's name, within TITLE_MAX_CHARS."""
    suffix = f" {PRODUCT_NAMES[product_type]}"
    text = prompt.split(",")[0].strip() or prompt
    room = TITLE_MAX_CHARS - len(suffix)
    if len(text) > room:
        text = text[: room - 1].rstrip() + "…"
    return text + suffix


def _payload(params: Any, design: dict[str, Any], product_type: str) -> dict[str, Any]:
    tags = list(params.get("tags") or []) or [
        value for value in (_text(params, name) for name in ("theme", "style", "niche")) if value
    ]
    prices = {**DEFAULT_PRICES, **(params.get("prices") or {})}
    return {
        "title": _title(design["prompt"], product_type),
        "description": design["prompt"],
        "product_type": product_type,
        "tags": [*tags, product_type],
        "price": prices[product_type],
        "design": design["artifact"],
    }


def publish(ctx: StageContext) -> dict[str, Any]:
    """With autoPublish (the seed's default), each mockup to every active destination of
    the job's project; idempotent, so a retry sends only what failed."""
    job = Job.objects.only("project_id", "started_at").get(pk=ctx.job_id)
    made = ctx.inputs["mockups"]
    products: list[dict[str, Any]] = []
    errors: list[str] = []
    if ctx.params.get("autoPublish", True):
        destinations: list[Destination] = []
        if job.project_id is None:
            errors.append("autoPublish: the job has no project, so it has no destinations.")
        else:
            destinations = list(
                Destination.objects.filter(project_id=job.project_id, active=True).order_by("name")
            )
            if not destinations:
                errors.append("autoPublish: the project has no active destination.")
        designs = {design["index"]: design for design in made["designs"]}
        outcome = PublishingOutcome()
        for item in made["mockups"]:
            design = designs[item["design"]]
            for destination in destinations:
                # A destination may take only some product types (a Printify shop's
                # blueprint is one garment).
                accepted = destination.config.get("product_types")
                if isinstance(accepted, list) and item["type"] not in accepted:
                    continue
                publication = outcome.publish(
                    destination=destination,
                    artifact=item["artifact"],
                    payload=_payload(ctx.params, design, item["type"]),
                    log=ctx.log,
                )
                if publication is None:
                    continue
                products.append(
                    {
                        "platform": destination.kind,
                        "productId": publication.external_id,
                        "url": publication.url,
                        "type": item["type"],
                        "design": item["design"],
                        "destination": str(destination.pk),
                        "publication": str(publication.pk),
                    }
                )
        outcome.raise_if_failed()
    started = job.started_at or timezone.now()
    total_ms = round((timezone.now() - started).total_seconds() * 1000)
    return {"products": products, "errors": errors, "totalTime": total_ms}


# --- the pipeline ------------------------------------------------------------------------


def pod_stages(params: dict[str, Any]) -> tuple[Stage, ...]:
    generates = tuple(generate_stage(i) for i in range(int(params.get("count", 1))))
    return (
        Stage("prompt", prompts),
        *(Stage(name, engine_type=IMAGE_GENERATION, depends_on=("prompt",)) for name in generates),
        Stage("mockups", mockups, depends_on=("prompt", *generates)),
        Stage("publish", publish, depends_on=("mockups",)),
    )


def pod_result(outputs: dict[str, Any], dag: Dag) -> dict[str, Any]:
    made, published = outputs["mockups"], outputs["publish"]
    return {
        "success": not published["errors"],
        "generatedImages": [
            {
                "id": design["id"],
                "url": media_reference(design["artifact"]),
                "prompt": design["prompt"],
                "seed": design["seed"],
                "width": design["width"],
                "height": design["height"],
                "generator": design["generator"],
            }
            for design in made["designs"]
        ],
        "products": published["products"],
        "mockups": [
            {
                "design": item["design"],
                "type": item["type"],
                "url": media_reference(item["artifact"]),
            }
            for item in made["mockups"]
        ],
        "errors": published["errors"],
        "totalTime": published["totalTime"],
    }


_TEXT = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": r"\S"}

POD_DESIGN = register(
    Pipeline(
        name="pod_design",
        description="Print-on-demand designs (seed 001): a prompt (or one built from theme, "
        "style and niche), `count` images on an image_generation engine, t-shirt and hoodie "
        "mockups, published to the project's destinations when `autoPublish`.",
        stages=pod_stages({}),
        expand=pod_stages,
        result=pod_result,
        params_schema={
            "type": "object",
            "properties": {
                "prompt": {**_TEXT, "maxLength": 2000},
                "theme": _TEXT,
                "style": _TEXT,
                "niche": _TEXT,
                "productTypes": {
                    "type": "array",
                    "items": {"enum": list(PRODUCT_TYPES)},
                    "minItems": 1,
                    "uniqueItems": True,
                },
                "count": {"type": "integer", "minimum": 1, "maximum": MAX_COUNT},
                "autoPublish": {"type": "boolean"},
                "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
                "width": {"type": "integer", "minimum": 256, "maximum": MAX_EDGE, "multipleOf": 64},
                "height": {
                    "type": "integer",
                    "minimum": 256,
                    "maximum": MAX_EDGE,
                    "multipleOf": 64,
                },
                "tags": {"type": "array", "items": _TEXT, "maxItems": 20},
                "prices": {
                    "type": "object",
                    "properties": {
                        kind: {"type": "number", "minimum": 0, "maximum": 100_000}
                        for kind in PRODUCT_TYPES
                    },
                    "additionalProperties": False,
                },
            },
            "required": ["productTypes"],
            # Something to draw: a prompt, or what to build one from. (An if/then, not an
            # anyOf: its error names the missing field instead of quoting the params.)
            "if": {
                "not": {"anyOf": [{"required": [name]} for name in ("theme", "style", "niche")]}
            },
            "then": {"required": ["prompt"]},
            "additionalProperties": False,
        },
    )
)
