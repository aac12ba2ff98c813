"""Seed 004's report_generation as the `report` pipeline.

`report` takes `inputs` (`[{"input_id", "type": "text"|"json"|"image", "data"}]`) through
the seed's agents data_ingest → data_analysis → synthesis; its `execution_mode` picks
the DAG shape (`report_stages`):

- sequential: data_ingest → embed → data_analysis → synthesis;
- parallel: one `data_ingest_<n>` per input and `embed`, all at once → data_analysis →
  synthesis;
- hybrid: one ingest per input type present (`data_ingest_text`, `_json`, `_image`) at
  once, `embed` after the text one → data_analysis → synthesis.

Ingest, embed and data_analysis are the `data_analysis` pipeline's stages
(jobs/pipelines/data_analysis.py). synthesis stores `report.md`, `report.html` (the
Markdown rendered, every piece of input text escaped) and `summary.json` as the job's
artifacts.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from jobs.pipelines.context import StageContext
from jobs.pipelines.data_analysis import (
    _EXAMPLE_PARAMS,
    ANALYSIS,
    EMBED,
    INGEST,
    INPUT_TYPES,
    INPUTS_SCHEMA,
    _has_text,
    _inputs_of,
    analyse,
    embed_many,
    ingest_all,
    ingest_one_input,
    ingest_one_type,
)
from jobs.pipelines.registry import Pipeline, Stage, register
from omniva.media import artifact_save, job_artifact_name, media_reference

EXECUTION_MODES = ("sequential", "parallel", "hybrid")
DEFAULT_EXECUTION_MODE = "sequential"
METADATA_MAX_KEYS = 50
METADATA_VALUE_MAX_CHARS = 2000
DEFAULT_TITLE = "Report"
TITLE_KEYS = ("report_title", "title")
SYNTHESIS = "synthesis"


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


# --- DAG shape -----------------------------------------------------------------------------


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
