"""The gRPC protocol's side of seed 004: the generated modules (made by `make grpc`, never on
import), and the tables that map jobs, stages and error codes onto its messages and
status codes.
"""

from __future__ import annotations

import grpc

from jobs.models import JobStatus, StageStatus
from omniva.errors import ErrorCode, http_status_for

try:
    # Re-exported (`as`): the servicer, the messages and the stream import them from here.
    from grpc_services.generated import orchestrator_pb2 as orchestrator_pb2
    from grpc_services.generated import orchestrator_pb2_grpc as orchestrator_pb2_grpc
except ImportError as exc:  # a checkout where make never ran
    raise ImportError(
        "The gRPC code is generated from protos/ by `make grpc` (jobs/grpc/codegen.py); "
        "run it first."
    ) from exc

# Seed 004's task types that are named otherwise here.
SEED_TASK_TYPES = {"report_generation": "report"}


EXECUTION_MODE_PARAM = {
    orchestrator_pb2.SEQUENTIAL: "sequential",
    orchestrator_pb2.PARALLEL: "parallel",
    orchestrator_pb2.HYBRID: "hybrid",
}


DEFAULT_PRIORITY = 5


TASK_ID_MAX_CHARS = 200


# Keyed by the status a row holds (a str; JobStatus and StageStatus are str choices).
STATUS_OF_JOB: dict[str, orchestrator_pb2.TaskStatus] = {
    JobStatus.PENDING: orchestrator_pb2.PENDING,
    JobStatus.RUNNING: orchestrator_pb2.RUNNING,
    JobStatus.RETRYING: orchestrator_pb2.RETRYING,
    JobStatus.COMPLETED: orchestrator_pb2.COMPLETED,
    JobStatus.FAILED: orchestrator_pb2.FAILED,
    JobStatus.CANCELLED: orchestrator_pb2.CANCELLED,
    JobStatus.TIMED_OUT: orchestrator_pb2.TIMED_OUT,
}


STATUS_OF_STAGE: dict[str, orchestrator_pb2.TaskStatus] = {
    StageStatus.WAITING: orchestrator_pb2.PENDING,
    StageStatus.QUEUED: orchestrator_pb2.PENDING,
    StageStatus.RUNNING: orchestrator_pb2.RUNNING,
    StageStatus.COMPLETED: orchestrator_pb2.COMPLETED,
    StageStatus.FAILED: orchestrator_pb2.FAILED,
    StageStatus.CANCELLED: orchestrator_pb2.CANCELLED,
    StageStatus.TIMED_OUT: orchestrator_pb2.TIMED_OUT,
}


# The REST errors' gRPC codes. Codes not named here: *_NOT_FOUND is NOT_FOUND, a 409
# conflict is FAILED_PRECONDITION, anything else INTERNAL.
STATUS_OF_ERROR = {
    ErrorCode.MALFORMED_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.VALIDATION_ERROR: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_PIPELINE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_ACCEPTABLE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.QUEUE_SATURATED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL_ERROR: grpc.StatusCode.INTERNAL,
}


# Trailing metadata of a failed call: the OmnivaError code, its details (JSON), and for
# RESOURCE_EXHAUSTED the seconds to wait.
ERROR_CODE_METADATA = "omniva-error-code"


ERROR_DETAILS_METADATA = "omniva-error-details"


RETRY_AFTER_METADATA = "retry-after"


# A stream resumes after this request metadata when after_sequence is not given (clients
# built from the seed's own definitions have no such field).
LAST_EVENT_ID_METADATA = "last-event-id"


def grpc_status_for(code: ErrorCode) -> grpc.StatusCode:
    if code in STATUS_OF_ERROR:
        return STATUS_OF_ERROR[code]
    if code.endswith("_NOT_FOUND"):
        return grpc.StatusCode.NOT_FOUND
    if http_status_for(code) == 409:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL
