"""What an engine does with each event type: one handler per event type name.

A handler is `fn(data, report_progress) -> result`: `data` is the event's data, the
result must be JSON-able, `report_progress(percent)` tells the server how far it got
(0-100; it also keeps the lease alive). Raising `HandlerError` (or anything else)
fails the event. Events made by the orchestrator for a job stage carry
`{"job_id", "pipeline", "stage", "params", "inputs"}` as their data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

ProgressFn = Callable[[float], None]
Handler = Callable[[dict[str, Any], ProgressFn], Any]

SLEEP_MAX_S = 60.0

_HANDLERS: dict[str, Handler] = {}


class HandlerError(Exception):
    """A handler's own failure, with a stable code for the event's error."""

    def __init__(self, message: str, code: str = "HANDLER_ERROR") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def register_handler(event_type: str, fn: Handler) -> Handler:
    """Handle events of `event_type` with `fn` (replacing any earlier handler)."""
    _HANDLERS[event_type] = fn
    return fn


def get_handler(name: str) -> Handler | None:
    return _HANDLERS.get(name)


def handler_names() -> list[str]:
    return sorted(_HANDLERS)


def is_stage_event(data: Any) -> bool:
    """Whether the event runs a job stage (the orchestrator's data shape)."""
    return (
        isinstance(data, dict)
        and "job_id" in data
        and "stage" in data
        and isinstance(data.get("params"), dict)
    )


def event_params(data: dict[str, Any]) -> dict[str, Any]:
    """The parameters of the work: a job's params for a stage event, else the data."""
    return data["params"] if is_stage_event(data) else data


# --- built-in handlers ---------------------------------------------------------------


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


def image_generation(data: dict[str, Any], report_progress: ProgressFn) -> dict[str, Any]:
    """Text to image (engines/sdk/image_generation.py): ComfyUI when OMNIVA_COMFYUI_URL names
    one, else the procedural generator. Imported on first use, so that engines of other
    types never load Pillow (and that module can import this one)."""
    from engines.sdk.image_generation import handler_from_environment

    return handler_from_environment()(data, report_progress)


register_handler("echo", echo)
register_handler("sleep", sleep)
register_handler("image_generation", image_generation)
