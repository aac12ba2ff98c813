"""What a stage function sees: its context, and the exceptions that steer the orchestrator.

A stage function takes a StageContext and returns a JSON-serializable output. It
raises StageError for a failure it can name (retryable or not); any other exception is
a transient failure and is retried. `ctx.progress()` and `ctx.log()` are checkpoints:
when the job was cancelled, or this attempt lost its lease, they raise a
StageInterrupted, which stage code must let through (it is not an Exception).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class StageError(Exception):
    """A failure with a stable code; `retryable=False` fails the job without retries."""

    def __init__(self, code: str, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class StageInterrupted(BaseException):
    """The attempt must stop now; BaseException so `except Exception` in stage code misses it."""


class StageCancelled(StageInterrupted):
    pass


class StageTimedOut(StageInterrupted):
    pass


class StageLeaseLost(StageInterrupted):
    """Another attempt holds the stage now (this one's lease ran out): drop the result."""


class StageReporter(Protocol):
    """Where a stage's reports go (the worker runtime passes jobs.services.stage_report):
    it writes progress or a log line, and raises StageInterrupted when the attempt must
    stop."""

    def __call__(
        self,
        *,
        stage_run_id: int,
        token: str,
        progress: float | None = None,
        message: str | None = None,
        level: str = "info",
    ) -> Any: ...


@dataclass
class StageContext:
    job_id: str
    stage: str
    stage_run_id: int
    attempt: int
    token: str
    params: Mapping[str, Any]
    inputs: Mapping[str, Any]
    reporter: StageReporter = field(repr=False)
    pipeline: str = ""
    _logs: list[str] = field(default_factory=list, repr=False)

    def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0-100) of this stage, optionally with a log line; a checkpoint."""
        self.reporter(
            stage_run_id=self.stage_run_id,
            token=self.token,
            progress=max(0.0, min(100.0, float(percent))),
            message=message,
        )

    def log(self, message: str, *, level: str = "info") -> None:
        """Append a line to the job's log; a checkpoint."""
        self.reporter(
            stage_run_id=self.stage_run_id, token=self.token, message=message, level=level
        )

    def checkpoint(self) -> None:
        """Raise StageInterrupted if the job was cancelled or the lease lost; writes nothing."""
        self.reporter(stage_run_id=self.stage_run_id, token=self.token)
