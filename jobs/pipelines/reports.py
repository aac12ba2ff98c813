"""Seed 004's orchestrator task types as pipelines: `report` (report_generation),
`data_analysis` and `api_call`.

`report` takes `inputs` (`[{"input_id", "type": "text"|"json"|"image", "data"}]`) through
the seed's agents data_ingest → data_analysis → synthesis; its `execution_mode` picks
the DAG shape (`report_stages`):

- sequential: data_ingest → embed → data_analysis → synthesis;
- parallel: one `data_ingest_<n>` per input and `embed`, all at once → data_analysis →
  synthesis;
- hybrid: one ingest per input type present (`data_ingest_text`, `_json`, `_image`) at
  once, `embed` after the text one → data_analysis → synthesis.

`embed` (only when there are text inputs) runs on the gpu queue, batched across jobs
like jobs/pipelines/gpu.py's, so data_analysis can cluster the texts by topic. Images come inline
(base64 or a data: URL), from an http(s) URL (through omniva.outbound) or as a media
file name, and are decoded and classified with jobs.pipelines.lib.imaging. synthesis stores
`report.md`, `report.html` (the Markdown rendered, every piece of input text escaped)
and `summary.json` as the job's artifacts. `data_analysis` is the same ingest and
analysis without the report; statistics are computed in jobs/pipelines/lib/analysis.py.

`api_call` makes one outbound HTTP request (omniva.outbound.request: SSRF guard, size
and time limits) with GET, HEAD, POST, PUT, PATCH or DELETE, retrying connection
failures, timeouts, 5xx, 408 and 429 inside the stage with a short backoff before it
hands the failure to the engine's retries; any other answer, 4xx included, is the
result with its status, headers and body.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import math
import re
import time
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
from omniva import outbound
from omniva.media import artifact_save, job_artifact_name, media_reference

INPUT_TYPES = ("text", "json", "image")
EXECUTION_MODES = ("sequential", "parallel", "hybrid")
DEFAULT_EXECUTION_MODE = "sequential"
INPUTS_MAX = 100
INPUT_ID_MAX_CHARS = 200
TEXT_MAX_CHARS = 200_000
JSON_INPUT_MAX_BYTES = 1024 * 1024
# Inline images travel in the job's params; larger ones belong at a URL or in media.
IMAGE_INLINE_MAX_BYTES = 8 * 1024 * 1024
IMAGE_DATA_MAX_CHARS = 4 * math.ceil(IMAGE_INLINE_MAX_BYTES / 3) + 256
METADATA_MAX_KEYS = 50
METADATA_VALUE_MAX_CHARS = 2000
DEFAULT_TITLE = "Report"
TITLE_KEYS = ("report_title", "title")

INGEST = "data_ingest"
EMBED = "embed"
ANALYSIS = "data_analysis"
SYNTHESIS = "synthesis"

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

REPORT_PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "inputs": INPUTS_SCHEMA,
        "execution_mode": {"enum": list(EXECUTION_MODES)},
        "metadata": {
            "type": "object",
            "maxProperties": METADATA_MAX_KEYS,
            "propertyNames": {"maxLength": 100},
            "additionalProperties": {
                "type": ["string", "number", "boolean", "null"],
                "maxLength": METADATA_VALUE_MAX_CHARS,
            },
        },
    },
    "required": ["inputs"],
    "additionalProperties": False,
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


# --- DAG shapes ----------------------------------------------------------------------------


def _has_text(inputs: list[dict[str, Any]]) -> bool:
    return any(item.get("type") == "text" for item in inputs)


def report_stages(params: dict[str, Any]) -> tuple[Stage, ...]:
    """The stages of one `report` job, shaped by its execution_mode and its inputs."""
    inputs = _inputs_of(params)
    mode = params.get("execution_mode", DEFAULT_EXECUTION_MODE)
    with_embed = _has_text(inputs)
    if mode == "parallel":
        ingests = tuple(f"{INGEST}_{index}" for index in range(len(inputs)))
        stages = [Stage(name, ingest_one_input) for name in ingests]
        embed_parents: tuple[str, ...] = ()
    elif mode == "hybrid":
        present = [kind for kind in INPUT_TYPES if any(i.get("type") == kind for i in inputs)]
        ingests = tuple(f"{INGEST}_{kind}" for kind in present)
        stages = [Stage(name, ingest_one_type) for name in ingests]
        embed_parents = (f"{INGEST}_text",) if with_embed else ()
    else:
        ingests = (INGEST,)
        stages = [Stage(INGEST, ingest_all)]
        embed_parents = ingests
    analysis_parents = ingests
    if with_embed:
        stages.append(Stage(EMBED, depends_on=embed_parents, queue="gpu", batch=embed_many))
        analysis_parents = (*ingests, EMBED)
    stages.append(Stage(ANALYSIS, analyse, depends_on=analysis_parents))
    stages.append(Stage(SYNTHESIS, synthesize, depends_on=(ANALYSIS,)))
    return tuple(stages)


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


# --- synthesis -----------------------------------------------------------------------------

# Python-Markdown's inline syntax characters (`|` for the tables extension); `#` too, so
# that a title cannot lose a trailing `#` to the heading syntax.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|#!])")


def inline_text(value: Any) -> str:
    """User text as Markdown that renders as exactly that text and nothing else: on one
    line, HTML-escaped (Python-Markdown passes raw HTML through) and with Markdown's
    inline syntax escaped (no links, images, emphasis or table breaks)."""
    flat = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(flat, quote=False))


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.6g}"


NUMERIC_COLUMNS = ("count", "mean", "median", "stdev", "min", "max")


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _title(metadata: dict[str, Any]) -> str:
    for key in TITLE_KEYS:
        if metadata.get(key) not in (None, ""):
            return str(metadata[key])
    return DEFAULT_TITLE


def _input_summary(item: dict[str, Any]) -> str:
    if item["type"] == "text":
        return (
            f"{_counted(item['words'], 'word')}, {_counted(item['sentences'], 'sentence')}, "
            f"{_counted(item['characters'], 'character')}"
        )
    if item["type"] == "json":
        return f"{item['values']} values, {item['numbers']} numbers"
    return f"{item['width']}x{item['height']} {item['category']}"


def report_markdown(title: str, metadata: dict[str, Any], summary: dict[str, Any]) -> str:
    """The report as Markdown; every piece of input text goes through `inline_text`."""
    lines = [f"# {inline_text(title)}", ""]
    extra = {key: value for key, value in metadata.items() if key not in TITLE_KEYS}
    if extra:
        lines += ["## Metadata", ""]
        lines += _table(
            ["Key", "Value"],
            [
                [inline_text(key), inline_text(v if isinstance(v, str) else json.dumps(v))]
                for key, v in extra.items()
            ],
        )
    inputs = summary["inputs"]
    counts = ", ".join(f"{n} {kind}" for kind, n in inputs["by_type"].items() if n)
    lines += ["## Inputs", "", f"{inputs['total']} inputs: {counts}.", ""]
    lines += _table(
        ["Input", "Type", "Summary"],
        [
            [inline_text(item["input_id"]), item["type"], _input_summary(item)]
            for item in inputs["items"]
        ],
    )
    text = summary["text"]
    if text:
        lines += [
            "## Text",
            "",
            f"- Documents: {text['documents']}",
            f"- Words: {text['words']} ({text['unique_words']} distinct)",
            f"- Sentences: {text['sentences']}",
            f"- Characters: {text['characters']}",
            f"- Average word length: {_number(text['average_word_length'])} characters",
            f"- Average sentence length: {_number(text['average_sentence_words'])} words",
            "",
        ]
        if text["top_terms"]:
            lines += ["### Top terms", ""]
            lines += _table(
                ["Term", "Count"],
                [[inline_text(t["term"]), str(t["count"])] for t in text["top_terms"]],
            )
    clusters = summary["clusters"]
    if clusters:
        silhouette = clusters["silhouette"]
        lines += [
            "## Topics",
            "",
            f"{_counted(clusters['k'], 'topic')} among the texts (k-means over "
            f"{inline_text(clusters['model'])} embeddings"
            + (f", silhouette {_number(silhouette)}" if silhouette is not None else "")
            + ").",
            "",
        ]
        for cluster in clusters["clusters"]:
            representative = cluster["representative"]
            lines += [
                f"### Topic {cluster['id'] + 1} ({_counted(cluster['size'], 'text')})",
                "",
                "- Inputs: " + ", ".join(inline_text(i) for i in cluster["input_ids"]),
                "- Terms: " + (", ".join(inline_text(t) for t in cluster["top_terms"]) or "n/a"),
                f"- Representative ({inline_text(representative['input_id'])}): "
                f"“{inline_text(representative['excerpt'])}”",
                "",
            ]
    documents = summary["json"]
    if documents:
        lines += [
            "## JSON",
            "",
            f"{_counted(documents['documents'], 'document')}, "
            f"{_counted(documents['values'], 'value')} ("
            + ", ".join(f"{n} {kind}" for kind, n in documents["types"].items())
            + ").",
            "",
        ]
        if documents["numeric"]:
            lines += _table(
                ["Path", "Count", "Mean", "Median", "Stdev", "Min", "Max"],
                [
                    [
                        inline_text(path),
                        *(_number(stats[key]) for key in NUMERIC_COLUMNS),
                    ]
                    for path, stats in documents["numeric"].items()
                ],
            )
    images = summary["images"]
    if images:
        lines += ["## Images", ""]
        lines += _table(
            ["Input", "Size", "Category", "Dominant colours"],
            [
                [
                    inline_text(image["input_id"]),
                    f"{image['width']}x{image['height']}",
                    image["category"],
                    ", ".join(
                        f"{color['hex']} ({round(100 * color['share'])}%)"
                        for color in image["dominant_colors"]
                    ),
                ]
                for image in images["items"]
            ],
        )
    return "\n".join(lines).rstrip() + "\n"


_PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
    "line-height:1.5;color:#1d2330}table{border-collapse:collapse;margin:.5rem 0 1rem}"
    "th,td{border:1px solid #cfd5de;padding:.25rem .6rem;text-align:left}"
    "th{background:#f1f3f6}"
)


def report_html(title: str, markdown_text: str) -> str:
    """A standalone HTML page of the Markdown report (which carries no raw HTML)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_PAGE_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def synthesize(ctx: StageContext) -> dict[str, Any]:
    """Store the report (Markdown, HTML, JSON summary) as the job's artifacts."""
    summary = ctx.inputs[ANALYSIS]
    metadata = dict(ctx.params.get("metadata") or {})
    title = _title(metadata)
    markdown_text = report_markdown(title, metadata, summary)
    page = report_html(title, markdown_text)
    ctx.progress(50.0, "report rendered")
    names = {
        "markdown_url": artifact_save(
            job_artifact_name(ctx.job_id, "report.md"), markdown_text.encode()
        ),
        "html_url": artifact_save(job_artifact_name(ctx.job_id, "report.html"), page.encode()),
        "json_url": artifact_save(
            job_artifact_name(ctx.job_id, "summary.json"),
            json.dumps(summary, ensure_ascii=False, indent=2).encode(),
        ),
    }
    return {
        "title": title,
        "report": {key: media_reference(name) for key, name in names.items()},
        "summary": summary,
        "execution_mode": ctx.params.get("execution_mode", DEFAULT_EXECUTION_MODE),
        "inputs": summary["inputs"]["total"],
    }


REPORT = register(
    Pipeline(
        name="report",
        description="Seed 004's report_generation: data_ingest → data_analysis (JSON and "
        "text statistics, topic clusters of the texts' embeddings on the gpu queue, image "
        "classification) → synthesis (Markdown, HTML and JSON artifacts); execution_mode "
        "sequential, parallel or hybrid shapes the DAG.",
        stages=report_stages(_EXAMPLE_PARAMS),
        expand=report_stages,
        params_schema=REPORT_PARAMS_SCHEMA,
    )
)

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


# --- api_call -------------------------------------------------------------------------------

API_CALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
API_CALL_BODY_METHODS = ("POST", "PUT", "PATCH")
API_CALL_MAX_TIMEOUT_S = 120.0
API_CALL_MAX_RESPONSE_BYTES = 1024 * 1024
API_CALL_MAX_REQUEST_BYTES = 1024 * 1024
# Tries inside one attempt of the stage, and the pauses between them; after the last
# the engine's own retries (30, 60, 120 s) take over.
API_CALL_TRIES = 3
API_CALL_BACKOFF_S = (0.5, 1.0)
# How often a pause between tries looks for a cancel.
API_CALL_CHECK_EVERY_S = 0.25
# A header name is an RFC 9110 token; the ones outbound sets itself cannot be given.
_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$"
_MANAGED_HEADER = r"(?i)^(host|content-length|transfer-encoding|connection)$"
_HEADER_VALUE = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"
_TEXT_TYPES = re.compile(
    r"^(text/.+|application/(xml|javascript|x-www-form-urlencoded|.+\+xml))$", re.IGNORECASE
)

API_CALL_PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "minLength": 1, "maxLength": 2048},
        "method": {"enum": list(API_CALL_METHODS)},
        "headers": {
            "type": "object",
            "maxProperties": 50,
            "propertyNames": {"pattern": _HEADER_NAME, "not": {"pattern": _MANAGED_HEADER}},
            "additionalProperties": {"type": "string", "maxLength": 8192, "pattern": _HEADER_VALUE},
        },
        "json": {},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": API_CALL_MAX_TIMEOUT_S},
    },
    "required": ["url"],
    "additionalProperties": False,
    # A JSON body needs a method that sends one.
    "if": {"required": ["json", "method"]},
    "then": {"properties": {"method": {"enum": list(API_CALL_BODY_METHODS)}}},
}


def _decoded_body(body: bytes, content_type: str | None) -> tuple[Any, str]:
    """(body, encoding): parsed JSON for a JSON media type, text for textual ones (or
    none given) that decode, base64 for the rest."""
    media_type, _, parameters = (content_type or "").partition(";")
    media_type = media_type.strip().lower()
    charset = "utf-8"
    for parameter in parameters.split(";"):
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip('"')
    try:
        text = body.decode(charset)
    except (LookupError, UnicodeDecodeError):
        text = None
    # jsonb holds no NUL character; such a body goes as base64.
    if text is not None and "\x00" not in text and "\\u0000" not in text:
        if media_type == "application/json" or media_type.endswith("+json"):
            try:
                return json.loads(text, parse_constant=_refuse_constant), "json"
            except (ValueError, RecursionError):
                pass
        if not media_type or _TEXT_TYPES.match(media_type) or media_type.endswith("json"):
            return text, "text"
    return base64.b64encode(body).decode("ascii"), "base64"


def _answer(fetched: outbound.Fetched, method: str) -> dict[str, Any]:
    if method == "HEAD":  # the answer to a HEAD has no body, whatever it says
        decoded, encoding = None, None
    else:
        decoded, encoding = _decoded_body(fetched.body, fetched.content_type)
    return {
        "status": fetched.status,
        # jsonb holds no NUL character; a header carrying one is left out.
        "headers": {
            name: value
            for name, value in fetched.headers.items()
            if "\x00" not in name and "\x00" not in value
        },
        "body": decoded,
        "body_encoding": encoding,
        "url": fetched.final_url,
    }


def _worth_another_try(exc: outbound.OutboundError) -> bool:
    # outbound counts a refused connection as permanent (right for a fetched input);
    # an API being restarted refuses connections for a moment, and seed 004 retries
    # connection errors.
    return exc.transient or isinstance(exc.__cause__, ConnectionRefusedError)


def _pause(ctx: StageContext, seconds: float) -> None:
    """Wait `seconds`, looking for a cancel now and then."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ctx.checkpoint()
        time.sleep(min(left, API_CALL_CHECK_EVERY_S))
    ctx.checkpoint()


def api_call(ctx: StageContext) -> dict[str, Any]:
    """One HTTP request; returns {status, headers, body, body_encoding, url, tries} for
    any answer but those asking to come back later (5xx, 408, 429), which are tried
    again and then fail retryable."""
    params = ctx.params
    url = str(params["url"])
    has_json = "json" in params
    method = str(params.get("method") or ("POST" if has_json else "GET")).upper()
    if method not in API_CALL_METHODS or (has_json and method not in API_CALL_BODY_METHODS):
        raise StageError(INVALID_INPUT, f"Method {method} cannot be used here.", retryable=False)
    headers = {str(k): str(v) for k, v in (params.get("headers") or {}).items()}
    body: bytes | None = None
    content_type: str | None = None
    if has_json:
        try:
            body = json.dumps(params["json"], allow_nan=False).encode()
        except ValueError as exc:
            raise StageError(
                INVALID_INPUT, f"`json` is not valid JSON: {exc}", retryable=False
            ) from exc
        if len(body) > API_CALL_MAX_REQUEST_BYTES:
            raise StageError(
                INPUT_TOO_LARGE,
                f"The JSON body is over {API_CALL_MAX_REQUEST_BYTES} bytes.",
                retryable=False,
            )
        # The caller's Content-Type (application/merge-patch+json, say) names the body.
        content_type = "application/json"
        for name in [name for name in headers if name.lower() == "content-type"]:
            content_type = headers.pop(name)
    timeout_s = min(
        float(params.get("timeout_s") or settings.OMNIVA_FETCH_TIMEOUT_S), API_CALL_MAX_TIMEOUT_S
    )
    for attempt in range(1, API_CALL_TRIES + 1):
        ctx.checkpoint()
        try:
            fetched = outbound.request(
                method,
                url,
                body=body,
                content_type=content_type,
                headers=headers,
                max_bytes=API_CALL_MAX_RESPONSE_BYTES,
                timeout_s=timeout_s,
                raise_for_status=False,
            )
            come_back_later = fetched.status_error()
            if come_back_later is not None and come_back_later.transient:
                raise come_back_later
        except outbound.OutboundError as exc:
            if not _worth_another_try(exc):
                raise StageError(exc.code, exc.message, retryable=False) from exc
            if attempt == API_CALL_TRIES:
                raise StageError(
                    exc.code, f"{exc.message} (tried {API_CALL_TRIES} times)", retryable=True
                ) from exc
            pause = API_CALL_BACKOFF_S[attempt - 1]
            ctx.log(
                f"try {attempt} failed: {exc.message}; trying again in {pause} s", level="warning"
            )
            _pause(ctx, pause)
            continue
        except ValueError as exc:  # a header outbound or http.client will not send
            raise StageError(INVALID_INPUT, str(exc), retryable=False) from exc
        return {**_answer(fetched, method), "tries": attempt}
    raise AssertionError("unreachable: the last try returns or raises")


API_CALL = register(
    Pipeline(
        name="api_call",
        description="Seed 004's api_call: one outbound HTTP request (GET, HEAD, POST, PUT, "
        "PATCH or DELETE; private and loopback addresses refused unless "
        "OMNIVA_ALLOW_PRIVATE_URLS), retried on connection errors, timeouts, 5xx, 408 and "
        "429 with backoff; any other answer, 4xx included, is the result with its status, "
        "headers and body.",
        stages=(Stage("api_caller", api_call),),
        params_schema=API_CALL_PARAMS_SCHEMA,
    )
)
