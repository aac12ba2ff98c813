"""One handler turns every exception raised under a DRF view into an enveloped error.

Client errors get a stable code (omniva.errors); anything unexpected is logged with
its traceback and answered 500 INTERNAL_ERROR, with no detail leaving the server.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import InterfaceError, OperationalError
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from omniva.api.envelope import error_body
from omniva.errors import ErrorCode, OmnivaError

logger = logging.getLogger("omniva.api")

DATABASE_RETRY_AFTER_S = 5

_STATUS_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.VALIDATION_ERROR,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.PERMISSION_DENIED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    406: ErrorCode.NOT_ACCEPTABLE,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.SERVICE_UNAVAILABLE,
}


def _message(detail: Any) -> str:
    if isinstance(detail, list | tuple) and detail:
        return _message(detail[0])
    if isinstance(detail, dict) and detail:
        return _message(next(iter(detail.values())))
    return str(detail)


def _validation_details(detail: Any) -> dict[str, Any]:
    if isinstance(detail, dict):
        return detail
    return {"non_field_errors": detail if isinstance(detail, list) else [detail]}


def _not_found_code(context: dict[str, Any]) -> ErrorCode:
    view = context.get("view")
    return getattr(view, "not_found_code", ErrorCode.NOT_FOUND)


def envelope_exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    headers: dict[str, str] = {}
    details: Any = None

    if isinstance(exc, OmnivaError):
        code, status, message, details = exc.code, exc.status, exc.message, exc.details
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, Http404 | exceptions.NotFound):
        code = _not_found_code(context)
        status = 404
        message = str(exc.detail) if isinstance(exc, exceptions.NotFound) else "Not found."
    elif isinstance(exc, RequestDataTooBig):
        code, status, message = ErrorCode.PAYLOAD_TOO_LARGE, 413, "The request body is too large."
    elif isinstance(exc, DjangoPermissionDenied):
        code, status, message = ErrorCode.PERMISSION_DENIED, 403, str(exc) or "Permission denied."
    elif isinstance(exc, DjangoValidationError):
        code, status = ErrorCode.VALIDATION_ERROR, 400
        details = _validation_details(
            exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        )
        message = _message(details)
    elif isinstance(exc, exceptions.ParseError):
        code, status = ErrorCode.MALFORMED_REQUEST, 400
        message = str(exc.detail)
    elif isinstance(exc, exceptions.ValidationError):
        code, status = ErrorCode.VALIDATION_ERROR, 400
        details = _validation_details(exc.detail)
        message = _message(details)
    elif isinstance(exc, exceptions.Throttled):
        code, status = ErrorCode.RATE_LIMITED, 429
        wait = max(1, math.ceil(exc.wait or 1))  # type: ignore[attr-defined]  # stub gap: set in __init__
        headers["Retry-After"] = str(wait)
        message = f"Too many requests; retry in {wait} s."
    elif isinstance(exc, exceptions.APIException):
        status = exc.status_code
        code = _STATUS_CODES.get(
            status, ErrorCode.VALIDATION_ERROR if status < 500 else ErrorCode.INTERNAL_ERROR
        )
        message = _message(exc.detail)
        auth_header = getattr(exc, "auth_header", None)
        if auth_header:
            headers["WWW-Authenticate"] = auth_header
        wait = getattr(exc, "wait", None)
        if wait:
            headers["Retry-After"] = str(math.ceil(wait))
    elif isinstance(exc, OperationalError | InterfaceError):
        logger.warning("database unavailable: %s", exc.__class__.__name__)
        code, status = ErrorCode.SERVICE_UNAVAILABLE, 503
        message = "The database is unavailable; retry shortly."
        headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
    else:
        request = context.get("request")
        logger.exception(
            "unhandled error in %s %s",
            getattr(request, "method", "?"),
            getattr(request, "path", "?"),
        )
        code, status, message = ErrorCode.INTERNAL_ERROR, 500, "Internal server error."

    set_rollback()
    return Response(error_body(code, message, details), status=status, headers=headers)
