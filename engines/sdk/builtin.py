"""The handlers every engine process has: `echo`, `sleep` and `image_generation`.

Importing this module registers nothing: `register_builtin_handlers()` does, once, where
the engine process starts (`manage.py run_engine`), and in the tests that run handlers.
"""

from __future__ import annotations

import time
from typing import Any

from engines.sdk import image_generation
from engines.sdk.handlers import (
    HandlerError,
    ProgressFn,
    event_params,
    is_stage_event,
    register_handler,
)

SLEEP_MAX_S = 60.0


def echo(data: dict[str, Any], report_progress: ProgressFn) -> dict[str, Any]:
    """The `echo` message param of a job stage; any other event's whole data."""
    return {"echo": data["params"].get("message") if is_stage_event(data) else data}


def sleep(data: dict[str, Any], report_progress: ProgressFn) -> dict[str, Any]:
    """Sleep `seconds` (60 at most), reporting progress every second."""
    raw = event_params(data).get("seconds", 0)
    try:
        seconds = float(raw or 0)
    except (TypeError, ValueError):
        raise HandlerError(f"seconds must be a number, not {raw!r}", "INVALID_DATA") from None
    if not 0 <= seconds < float("inf"):
        raise HandlerError(f"seconds must be 0 or more, not {raw!r}", "INVALID_DATA")
    seconds = min(seconds, SLEEP_MAX_S)
    started = time.monotonic()
    deadline = started + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        report_progress(min(100.0, 100.0 * (time.monotonic() - started) / seconds))
    return {"slept_s": seconds}


def register_builtin_handlers(*, comfyui: image_generation.ComfyUIConfig | None = None) -> None:
    """Register `echo`, `sleep` and `image_generation` (replacing earlier handlers of
    those names). `image_generation` asks the ComfyUI server `comfyui` describes, or
    draws procedural art when there is none (engines/sdk/image_generation.py)."""
    register_handler("echo", echo)
    register_handler("sleep", sleep)
    register_handler(
        image_generation.EVENT_TYPE,
        image_generation.procedural
        if comfyui is None
        else image_generation.comfyui_handler(image_generation.ComfyUIClient(comfyui)),
    )
