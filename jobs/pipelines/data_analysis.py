"""Seed 004's `data_analysis` pipeline, and the stages it shares with `report`
(jobs/pipelines/reports.py): the inputs and their params schema, data_ingest, embed and
data_analysis.

Inputs are `[{"input_id", "type": "text"|"json"|"image", "data"}]`. `embed` (only when
there are text inputs) runs on the gpu queue, batched across jobs like
jobs/pipelines/gpu.py's, so data_analysis can cluster the texts by topic. Images come
inline (base64 or a data: URL), from an http(s) URL (through omniva.outbound) or as a
media file name, and are decoded and classified with jobs.pipelines.lib.imaging.
`data_analysis` is ingest and analysis without the report; statistics are computed in
jobs/pipelines/lib/analysis.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections import Counter
from dataclasses import replace
from typing import Any

from django.conf import settings

from jobs.pipelines.context import StageContext, StageError
from jobs.pipelines.gpu import EMBED_TEXT_MAX_CHARS, read_input
from jobs.pipelines.gpu import embed_many as embed_texts_many
from jobs.pipelines.lib.analysis import (
    image_statistics,
    json_statistics,
    text_clusters,
    text_counts,
    text_statistics,
)
from jobs.pipelines.registry import Pipeline, Stage, register

INPUT_TYPES = ("text", "json", "image")
INPUTS_MAX = 100
INPUT_ID_MAX_CHARS = 200
TEXT_MAX_CHARS = 200_000
JSON_INPUT_MAX_BYTES = 1024 * 1024
# Inline images travel in the job's params; larger ones belong at a URL or in media.
IMAGE_INLINE_MAX_BYTES = 8 * 1024 * 1024
IMAGE_DATA_MAX_CHARS = 4 * math.ceil(IMAGE_INLINE_MAX_BYTES / 3) + 256

INGEST = "data_ingest"
EMBED = "embed"
ANALYSIS = "data_analysis"

INVALID_INPUT = "INVALID_INPUT"
INPUT_TOO_LARGE = "INPUT_TOO_LARGE"


# --- params ------------------------------------------------------------------------------

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "input_id": {"type": "string", "minLength": 1, "maxLength": INPUT_ID_MAX_CHARS},
        "type": {"enum": list(INPUT_TYPES)},
        "data": {},
    },
    "required": ["input_id", "type", "data"],
    "additionalProperties": False,
    "allOf": [
        {
            "if": {"properties": {"type": {"const": "text"}}},
            "then": {"properties": {"data": {"type": "string", "maxLength": TEXT_MAX_CHARS}}},
        },
        {
            "if": {"properties": {"type": {"const": "image"}}},
            "then": {
                "properties": {
                    "data": {"type": "string", "minLength": 1, "maxLength": IMAGE_DATA_MAX_CHARS}
                }
            },
        },
    ],
}

INPUTS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": INPUTS_MAX,
    "items": INPUT_SCHEMA,
}

DATA_ANALYSIS_PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"inputs": INPUTS_SCHEMA},
    "required": ["inputs"],
    "additionalProperties": False,
}


def checked_inputs(params: Any) -> list[dict[str, Any]]:
    """The inputs, with what the params schema cannot say checked: unique input_ids."""
    inputs = params.get("inputs") if isinstance(params, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise StageError(INVALID_INPUT, "`inputs` must be a non-empty list.", retryable=False)
    repeated = sorted(
        input_id
        for input_id, count in Counter(item.get("input_id") for item in inputs).items()
        if count > 1
    )
    if repeated:
        raise StageError(
            INVALID_INPUT,
            f"Every input_id must be unique; repeated: {', '.join(map(str, repeated))}.",
            retryable=False,
        )
    return inputs


def _inputs_of(params: Any) -> list[dict[str, Any]]:
    """The inputs as far as they are well formed (for the DAG shape; stages check them)."""
    inputs = params.get("inputs") if isinstance(params, dict) else None
    return [item for item in inputs if isinstance(item, dict)] if isinstance(inputs, list) else []


# --- DAG shape -----------------------------------------------------------------------------


def _has_text(inputs: list[dict[str, Any]]) -> bool:
    return any(item.get("type") == "text" for item in inputs)


def data_analysis_stages(params: dict[str, Any]) -> tuple[Stage, ...]:
    """data_ingest and (with text inputs) embed at once, then data_analysis."""
    stages = [Stage(INGEST, ingest_all)]
    parents: tuple[str, ...] = (INGEST,)
    if _has_text(_inputs_of(params)):
        stages.append(Stage(EMBED, queue="gpu", batch=embed_many))
        parents = (INGEST, EMBED)
    stages.append(Stage(ANALYSIS, analyse, depends_on=parents))
    return tuple(stages)


# The shape /v1/pipelines shows: one text input, the default mode.
_EXAMPLE_PARAMS: dict[str, Any] = {"inputs": [{"input_id": "a", "type": "text", "data": ""}]}


# --- data_ingest ---------------------------------------------------------------------------


def ingest_all(ctx: StageContext) -> dict[str, Any]:
    """Every input, in order (sequential mode, and data_analysis)."""
    inputs = checked_inputs(ctx.params)
    records = []
    for index, item in enumerate(inputs):
        records.append(ingest_record(index, item))
        ctx.progress(100.0 * (index + 1) / len(inputs))
    return {"records": records}


def ingest_one_input(ctx: StageContext) -> dict[str, Any]:
    """The input at the position in the stage's name (parallel mode)."""
    inputs = checked_inputs(ctx.params)
    index = int(ctx.stage.rsplit("_", 1)[1])
    return {"records": [ingest_record(index, inputs[index])]}


def ingest_one_type(ctx: StageContext) -> dict[str, Any]:
    """The inputs of the type in the stage's name (hybrid mode)."""
    inputs = checked_inputs(ctx.params)
    kind = ctx.stage.rsplit("_", 1)[1]
    chosen = [(index, item) for index, item in enumerate(inputs) if item["type"] == kind]
    records = []
    for done, (index, item) in enumerate(chosen, start=1):
        records.append(ingest_record(index, item))
        ctx.progress(100.0 * done / len(chosen))
    return {"records": records}


def ingest_record(index: int, item: dict[str, Any]) -> dict[str, Any]:
    """One input made ready for analysis: the text, the parsed JSON value, or the
    image's classification (the image itself is not kept)."""
    base = {"index": index, "input_id": item["input_id"], "type": item["type"]}
    if item["type"] == "text":
        if not isinstance(item["data"], str):
            raise StageError(
                INVALID_INPUT, f"{item['input_id']}: text must be a string.", retryable=False
            )
        return {**base, "text": item["data"]}
    if item["type"] == "json":
        return {**base, "value": _json_value(item["input_id"], item["data"])}
    if item["type"] == "image":
        return {**base, **_image_record(item["input_id"], item["data"])}
    raise StageError(
        INVALID_INPUT, f"{item['input_id']}: unknown type {item['type']!r}.", retryable=False
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_value(input_id: str, data: Any) -> Any:
    """`data` itself, or parsed when it is a string (JSON text)."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant) if isinstance(data, str) else data
        encoded = json.dumps(value, allow_nan=False)
    except (ValueError, RecursionError) as exc:
        raise StageError(
            INVALID_INPUT, f"{input_id}: not valid JSON: {exc}", retryable=False
        ) from exc
    if len(encoded) > JSON_INPUT_MAX_BYTES:
        raise StageError(
            INPUT_TOO_LARGE,
            f"{input_id}: larger than {JSON_INPUT_MAX_BYTES} bytes as JSON.",
            retryable=False,
        )
    # PostgreSQL's jsonb holds no NUL character, and stage outputs are jsonb.
    if "\\u0000" in encoded:
        raise StageError(
            INVALID_INPUT, f"{input_id}: a string holds a NUL character.", retryable=False
        )
    return value


_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


def _looks_like_an_image(data: bytes) -> bool:
    signatures = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
    tiff = data[:4] in (b"II*\x00", b"MM\x00*")
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return data.startswith(signatures) or tiff or webp


def _image_bytes(input_id: str, data: str) -> tuple[bytes, str]:
    """(bytes, where they came from): a data: URL, an http(s) URL, inline base64 of an
    image, or else a media file name."""
    prefix = _DATA_URL.match(data)
    if prefix is None and data[:5].lower() == "data:":
        raise StageError(
            INVALID_INPUT,
            f"{input_id}: only base64 data: URLs of images are read.",
            retryable=False,
        )
    if prefix is not None:
        try:
            return base64.b64decode("".join(data[prefix.end() :].split()), validate=True), "base64"
        except (binascii.Error, ValueError) as exc:
            raise StageError(
                INVALID_INPUT, f"{input_id}: the data: URL is not valid base64.", retryable=False
            ) from exc
    if "://" in data:  # http(s) fetched through outbound, other schemes refused
        return read_input(data), "url"
    try:
        decoded = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if _looks_like_an_image(decoded):
        return decoded, "base64"
    return read_input(data), "media"


def _image_record(input_id: str, data: Any) -> dict[str, Any]:
    # torch: only a worker that reads an image loads it
    from jobs.pipelines.lib.imaging import classify_image, decode_image

    if not isinstance(data, str):
        raise StageError(
            INVALID_INPUT, f"{input_id}: image data must be a string.", retryable=False
        )
    content, source = _image_bytes(input_id, data)
    try:
        image = decode_image(content, max_pixels=settings.OMNIVA_IMAGE_MAX_PIXELS)
    except StageError as exc:
        raise StageError(exc.code, f"{input_id}: {exc.message}", retryable=exc.retryable) from exc
    return {"source": source, "bytes": len(content), **classify_image(image)}


# --- embed (gpu queue) ---------------------------------------------------------------------


def _texts_of(params: Any) -> list[tuple[str, str]]:
    return [
        (item["input_id"], item["data"])
        for item in checked_inputs(params)
        if item["type"] == "text"
    ]


def embed_many(contexts: list[StageContext]) -> list[Any]:
    """The text inputs of every context in one forward pass (jobs.pipelines.gpu.embed_many);
    one output ({model, dim, vectors, input_ids}) or StageError per context."""
    outcomes: list[Any] = [None] * len(contexts)
    proxies: list[StageContext] = []
    owners: list[tuple[int, list[str]]] = []
    for position, ctx in enumerate(contexts):
        try:
            texts = _texts_of(ctx.params)
        except StageError as exc:
            outcomes[position] = exc
            continue
        # The model reads a few hundred tokens at most; the rest only costs tokenizing.
        own = [text[:EMBED_TEXT_MAX_CHARS] for _, text in texts]
        proxies.append(replace(ctx, params={"texts": own}))
        owners.append((position, [input_id for input_id, _ in texts]))
    embedded = embed_texts_many(proxies) if proxies else []
    for (position, input_ids), outcome in zip(owners, embedded, strict=True):
        outcomes[position] = (
            outcome if isinstance(outcome, StageError) else {**outcome, "input_ids": input_ids}
        )
    return outcomes


# --- data_analysis -------------------------------------------------------------------------


IMAGE_FIELDS = ("width", "height", "aspect_ratio", "category", "dominant_colors", "bytes", "source")


def _records(ctx: StageContext) -> list[dict[str, Any]]:
    records = [
        record
        for name, output in ctx.inputs.items()
        if name.startswith(INGEST)
        for record in output["records"]
    ]
    return sorted(records, key=lambda record: record["index"])


def _input_detail(record: dict[str, Any]) -> dict[str, Any]:
    if record["type"] == "text":
        return text_counts(record["text"])
    if record["type"] == "json":
        stats = json_statistics([record["value"]])
        return {"values": stats["values"], "numbers": stats["types"].get("number", 0)}
    return {key: record[key] for key in ("width", "height", "category")}


def summarize(records: list[dict[str, Any]], embedding: dict[str, Any] | None) -> dict[str, Any]:
    """The statistics of ingested inputs: per input, text, topic clusters, JSON, images."""
    by_type = Counter(record["type"] for record in records)
    texts = [(r["input_id"], r["text"]) for r in records if r["type"] == "text"]
    documents = [r["value"] for r in records if r["type"] == "json"]
    images = [
        {"input_id": r["input_id"], **{key: r[key] for key in IMAGE_FIELDS}}
        for r in records
        if r["type"] == "image"
    ]
    clusters = None
    if texts and embedding is not None:
        vectors = dict(zip(embedding["input_ids"], embedding["vectors"], strict=True))
        clusters = text_clusters(
            texts, [vectors[input_id] for input_id, _ in texts], model=embedding["model"]
        )
    return {
        "inputs": {
            "total": len(records),
            "by_type": {kind: by_type.get(kind, 0) for kind in INPUT_TYPES},
            "items": [
                {"input_id": r["input_id"], "type": r["type"], **_input_detail(r)} for r in records
            ],
        },
        "text": text_statistics([text for _, text in texts]) if texts else None,
        "clusters": clusters,
        "json": json_statistics(documents) if documents else None,
        "images": image_statistics(images) if images else None,
    }


def analyse(ctx: StageContext) -> dict[str, Any]:
    return summarize(_records(ctx), ctx.inputs.get(EMBED))


DATA_ANALYSIS = register(
    Pipeline(
        name="data_analysis",
        description="Seed 004's data_analysis: statistics of text, JSON and image inputs "
        "(numeric statistics per JSON path, text statistics, topic clusters of the texts).",
        stages=data_analysis_stages(_EXAMPLE_PARAMS),
        expand=data_analysis_stages,
        params_schema=DATA_ANALYSIS_PARAMS_SCHEMA,
    )
)
