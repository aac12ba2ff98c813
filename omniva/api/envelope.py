"""The `{status, data, error, meta}` envelope every /v1 response is wrapped in.

DRF responses are wrapped by the renderer (omniva.api.renderers); the few responses
made outside DRF (413 from middleware, Django's 500 handler) use `error_response`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.http import HttpRequest, JsonResponse
from rest_framework.utils.encoders import JSONEncoder

from omniva.errors import ErrorCode, http_status_for


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def request_id_of(request: Any) -> str:
    return getattr(request, "request_id", "") if request is not None else ""


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": str(code), "message": message}
    if details is not None:
        body["details"] = details
    return body


def envelope(
    *,
    request: Any,
    data: Any = None,
    error: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "status": "error" if error is not None else "success",
        "data": data,
        "error": error,
        "meta": {
            "request_id": request_id_of(request),
            "generated_at": utc_now_iso(),
            **(meta or {}),
        },
    }


def error_response(
    request: HttpRequest,
    code: ErrorCode,
    message: str,
    *,
    status: int | None = None,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JsonResponse:
    """An enveloped error made outside DRF's view machinery."""
    response = JsonResponse(
        envelope(request=request, error=error_body(code, message, details)),
        status=status or http_status_for(code),
        encoder=JSONEncoder,
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response
