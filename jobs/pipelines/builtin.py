"""The built-in test pipelines: noop, sleep, fail_n_times, fan_out_fan_in.

They exercise the engine itself (priorities, retries, DAG ordering, cancellation,
timeouts) and are what `manage.py bench queue` measures.
"""

from __future__ import annotations

import time
from typing import Any

from jobs.pipelines.context import StageContext, StageError
from jobs.pipelines.registry import Dag, Pipeline, Stage, register


def noop(ctx: StageContext) -> dict[str, Any]:
    return {}


def sleep(ctx: StageContext) -> dict[str, Any]:
    """Sleep `seconds`, reporting progress every second (each report is a checkpoint)."""
    seconds = float(ctx.params.get("seconds", 1))
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < seconds:
        time.sleep(min(1.0, seconds - elapsed))
        elapsed = time.monotonic() - started
        ctx.progress(min(100.0, 100.0 * elapsed / seconds) if seconds else 100.0)
    return {"slept_s": seconds}


def fail_n_times(ctx: StageContext) -> dict[str, Any]:
    n = int(ctx.params.get("n", 1))
    if ctx.attempt <= n:
        raise StageError(
            "TRANSIENT_FAILURE", f"Attempt {ctx.attempt} fails on purpose (the first {n} do)."
        )
    return {"attempts": ctx.attempt}


def fan_out(ctx: StageContext) -> dict[str, Any]:
    return {"width": int(ctx.params.get("width", 3))}


def fan_part(ctx: StageContext) -> dict[str, Any]:
    index = int(ctx.stage.rsplit("_", 1)[1])
    return {"part": index, "square": index * index}


def fan_in(ctx: StageContext) -> dict[str, Any]:
    parts = sorted(output["part"] for name, output in ctx.inputs.items() if name != "split")
    return {"parts": parts, "sum_of_squares": sum(i * i for i in parts)}


def fan_stages(params: dict[str, Any]) -> tuple[Stage, ...]:
    width = int(params.get("width", 3))
    parts = tuple(f"part_{i}" for i in range(width))
    return (
        Stage("split", fan_out),
        *(Stage(name, fan_part, depends_on=("split",)) for name in parts),
        Stage("join", fan_in, depends_on=parts),
    )


def fan_result(outputs: dict[str, Any], dag: Dag) -> Any:
    return outputs["join"]


NOOP = register(
    Pipeline(
        name="noop",
        description="One stage that does nothing: the cost of the machinery itself.",
        stages=(Stage("noop", noop),),
    )
)

SLEEP = register(
    Pipeline(
        name="sleep",
        description="Sleeps `seconds`, reporting progress every second.",
        stages=(Stage("sleep", sleep),),
        params_schema={
            "type": "object",
            "properties": {"seconds": {"type": "number", "minimum": 0, "maximum": 86400}},
            "additionalProperties": False,
        },
    )
)

FAIL_N_TIMES = register(
    Pipeline(
        name="fail_n_times",
        description="The first `n` attempts raise a transient error; then it succeeds.",
        stages=(Stage("flaky", fail_n_times),),
        params_schema={
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 100}},
            "additionalProperties": False,
        },
    )
)

FAN_OUT_FAN_IN = register(
    Pipeline(
        name="fan_out_fan_in",
        description="One stage, `width` parallel stages that depend on it, one joining stage.",
        stages=fan_stages({}),
        expand=fan_stages,
        result=fan_result,
        params_schema={
            "type": "object",
            "properties": {"width": {"type": "integer", "minimum": 1, "maximum": 64}},
            "additionalProperties": False,
        },
    )
)

ENGINE_ECHO = register(
    Pipeline(
        name="engine_echo",
        description="One stage on an `echo` engine (manage.py run_engine --type echo): "
        "the engine returns what it was given.",
        stages=(Stage("echo", engine_type="echo"),),
        params_schema={
            "type": "object",
            "properties": {"message": {"type": "string", "maxLength": 10_000}},
            "additionalProperties": False,
        },
    )
)
