"""The one error type of Omniva and its stable codes.

Services raise `OmnivaError(ErrorCode.X, "message")`; the API's exception handler turns
it, and every other exception, into the envelope. `FailureCode` names the codes the
platform itself writes into a failed job's, stage run's or event's `error`. Both are
part of the contract (API.md, docs/jobs.md, docs/engines.md): add new ones, never
rename one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    UNKNOWN_PIPELINE = "UNKNOWN_PIPELINE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    ENGINE_NOT_FOUND = "ENGINE_NOT_FOUND"
    EVENT_NOT_FOUND = "EVENT_NOT_FOUND"
    EVENT_TYPE_NOT_FOUND = "EVENT_TYPE_NOT_FOUND"
    PROJECT_NOT_FOUND = "PROJECT_NOT_FOUND"
    CREATOR_NOT_FOUND = "CREATOR_NOT_FOUND"
    CLIP_NOT_FOUND = "CLIP_NOT_FOUND"
    DESTINATION_NOT_FOUND = "DESTINATION_NOT_FOUND"
    PUBLICATION_NOT_FOUND = "PUBLICATION_NOT_FOUND"
    SCHEDULE_NOT_FOUND = "SCHEDULE_NOT_FOUND"
    API_KEY_NOT_FOUND = "API_KEY_NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    NOT_ACCEPTABLE = "NOT_ACCEPTABLE"
    CONFLICT = "CONFLICT"
    ENGINE_ALREADY_REGISTERED = "ENGINE_ALREADY_REGISTERED"
    JOB_NOT_CANCELLABLE = "JOB_NOT_CANCELLABLE"
    JOB_NOT_RETRYABLE = "JOB_NOT_RETRYABLE"
    JOB_ACTIVE = "JOB_ACTIVE"
    EVENT_LEASE_LOST = "EVENT_LEASE_LOST"
    STAGE_LEASE_LOST = "STAGE_LEASE_LOST"
    UPLOAD_FAILED = "UPLOAD_FAILED"
    EMBEDDING_PENDING = "EMBEDDING_PENDING"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    RATE_LIMITED = "RATE_LIMITED"
    QUEUE_SATURATED = "QUEUE_SATURATED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class FailureCode(StrEnum):
    """The codes the platform writes into a job's, stage run's or event's `error`.

    A pipeline's stages and engine handlers have codes of their own for their own input
    (INVALID_INPUT, INVALID_IMAGE, ...): those stay with the pipeline. tests/omniva/
    test_errors.py fails on a code the platform writes that is not named here.
    """

    # Jobs and stage runs (jobs/services, jobs/worker.py).
    # The job ran past timeout_s, was not started within queue_timeout_s, or its engine
    # stage's deadline passed: the job ends `timed_out`, its unfinished stages with it.
    TIMEOUT = "TIMEOUT"
    # A running attempt's lease ran out (its worker stopped heartbeating): a failed
    # attempt, retried while retries are left.
    WORKER_LOST = "WORKER_LOST"
    # The stage raised an exception that is not a StageError: retried.
    STAGE_FAILED = "STAGE_FAILED"
    # The stage returned what JSON or PostgreSQL cannot hold: not retried.
    BAD_OUTPUT = "BAD_OUTPUT"
    # The worker that took the stage has no pipeline of that name installed: not retried.
    UNKNOWN_PIPELINE = "UNKNOWN_PIPELINE"
    # The pipeline's DAG for the job's params has no such stage (or could not be built):
    # not retried.
    UNKNOWN_STAGE = "UNKNOWN_STAGE"
    # An engine's failure report without a code: on the event, and on the engine stage
    # its dead-lettered event fails.
    ENGINE_ERROR = "ENGINE_ERROR"
    # A batch's parent job, when every one of its children failed.
    BATCH_FAILED = "BATCH_FAILED"

    # Events, as they are dead-lettered (engines/services/).
    # The event's last allowed lease ran out.
    LEASE_EXPIRED = "LEASE_EXPIRED"
    # The event was still pending or leased at its deadline (one that runs no job stage;
    # a job stage's ends with its job's TIMEOUT, as STAGE_ENDED).
    DEADLINE_PASSED = "DEADLINE_PASSED"
    # Moved to the dead letter queue by hand (the message is the reason given).
    DEAD_LETTERED = "DEAD_LETTERED"
    # The orchestrator ended the event's stage (its job was cancelled, timed out or failed).
    STAGE_ENDED = "STAGE_ENDED"

    # Events, as the engine runner reports them failed (engines' runner.py).
    # The engine has no handler for the event's type.
    UNKNOWN_EVENT_TYPE = "UNKNOWN_EVENT_TYPE"
    # The handler raised an exception that is not a HandlerError with a code of its own.
    HANDLER_ERROR = "HANDLER_ERROR"
    # The handler returned what JSON cannot hold.
    INVALID_RESULT = "INVALID_RESULT"
    # The server refused a completed report's result on its own (too large, not valid).
    RESULT_REJECTED = "RESULT_REJECTED"


# The HTTP status each code answers with, unless a raise site says otherwise.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.MALFORMED_REQUEST: 400,
    ErrorCode.VALIDATION_ERROR: 400,
    ErrorCode.UNKNOWN_PIPELINE: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.NOT_ACCEPTABLE: 406,
    ErrorCode.CONFLICT: 409,
    ErrorCode.ENGINE_ALREADY_REGISTERED: 409,
    ErrorCode.JOB_NOT_CANCELLABLE: 409,
    ErrorCode.JOB_NOT_RETRYABLE: 409,
    ErrorCode.JOB_ACTIVE: 409,
    ErrorCode.EMBEDDING_PENDING: 409,
    ErrorCode.EVENT_LEASE_LOST: 409,
    ErrorCode.STAGE_LEASE_LOST: 409,
    ErrorCode.UPLOAD_FAILED: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.QUEUE_SATURATED: 503,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}


def http_status_for(code: ErrorCode) -> int:
    if code.endswith("_NOT_FOUND") or code == ErrorCode.NOT_FOUND:
        return 404
    return HTTP_STATUS[code]


class OmnivaError(Exception):
    """An error a client can act on: a stable code, a message, optional details."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        status: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.status = status or http_status_for(code)
        self.retry_after_s = retry_after_s
