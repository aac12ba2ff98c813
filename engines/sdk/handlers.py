"""What an engine does with each event type: one handler per event type name.

A handler is `fn(data, report_progress) -> result`: `data` is the event's data, the
result must be JSON-able, `report_progress(percent)` tells the server how far it got
(0-100; it also keeps the lease alive). Raising `HandlerError` (or anything else)
fails the event. Events made by the orchestrator for a job stage carry
`{"job_id", "pipeline", "stage", "params", "inputs"}` as their data.

This module is the registry only: it registers nothing itself. The built-in handlers
(engines/sdk/builtin.py) are registered by `register_builtin_handlers()`, which the
engine process calls once when it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omniva.errors import FailureCode

ProgressFn = Callable[[float], None]
Handler = Callable[[dict[str, Any], ProgressFn], Any]

_HANDLERS: dict[str, Handler] = {}


class HandlerError(Exception):
    """A handler's own failure, with a stable code for the event's error."""

    def __init__(self, message: str, code: str = FailureCode.HANDLER_ERROR) -> None:
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
