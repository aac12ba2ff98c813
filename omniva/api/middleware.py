"""Request id, body size limit and the audit trail: the parts of /v1 that wrap every request."""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.messages.middleware import MessageMiddleware
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from omniva import audit
from omniva.api.envelope import error_response
from omniva.errors import ErrorCode
from omniva.models import ApiKey
from omniva.null_character import MESSAGE as NULL_CHARACTER_MESSAGE
from omniva.null_character import NULL, null_character_path

GetResponse = Callable[[HttpRequest], HttpResponse]

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_AUDITED_ENTITIES = 50


def is_api_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def note_entities(request: Any, *entity_ids: object) -> None:
    """Record ids a view touched, for its audit row (views call this when the
    response alone does not show them)."""
    http_request = getattr(request, "_request", request)
    noted = getattr(http_request, "audit_entities", None)
    if noted is None:
        noted = http_request.audit_entities = []
    noted.extend(str(entity_id) for entity_id in entity_ids if entity_id is not None)


class RequestIdMiddleware:
    """Keeps a well-formed incoming X-Request-ID, otherwise makes one; echoes it back."""

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        # Our own attribute (read back with getattr: omniva.api.envelope, the audit).
        request.request_id = request_id  # type: ignore[attr-defined]
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response


class BodySizeLimitMiddleware:
    """413 before the body is read when Content-Length says it is over the limit.

    Bodies sent without a length are caught when read (Django's RequestDataTooBig,
    mapped to the same 413 by the exception handler).
    """

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        raw_length = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0:
            return self._refuse(
                request, ErrorCode.MALFORMED_REQUEST, "Content-Length is not valid."
            )
        limit = settings.OMNIVA_MAX_BODY_BYTES
        if length > limit:
            return self._refuse(
                request,
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"The request body is {length} bytes; the limit is {limit}.",
            )
        return self.get_response(request)

    @staticmethod
    def _refuse(request: HttpRequest, code: ErrorCode, message: str) -> HttpResponse:
        response: HttpResponse
        if is_api_path(request.path):
            response = error_response(request, code, message)
        else:
            status = 413 if code == ErrorCode.PAYLOAD_TOO_LARGE else 400
            response = HttpResponse(message, status=status, content_type="text/plain")
        # The body was not read; the connection cannot be reused for another request.
        response["Connection"] = "close"
        return response


class QueryNullCharacterMiddleware:
    """400 VALIDATION_ERROR, naming the parameter, for a /v1 query string holding U+0000
    (PostgreSQL takes it in no text; a body's text is checked where it is parsed,
    omniva/api/parsers.py)."""

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # A query string carries U+0000 only percent-encoded: most requests stop here.
        if "%00" in request.META.get("QUERY_STRING", "") and is_api_path(request.path):
            for name, values in request.GET.lists():
                if null_character_path([name, *values]) is not None:
                    return error_response(
                        request,
                        ErrorCode.VALIDATION_ERROR,
                        NULL_CHARACTER_MESSAGE,
                        details={name.replace(NULL, "") or "query": [NULL_CHARACTER_MESSAGE]},
                    )
        return self.get_response(request)


def _touched_entities(request: HttpRequest, response: HttpResponse) -> list[str]:
    ids = list(getattr(request, "audit_entities", []))
    match = getattr(request, "resolver_match", None)
    if match is not None:
        ids.extend(str(value) for name, value in match.kwargs.items() if name in {"pk", "id"})
    data = getattr(response, "data", None)
    if isinstance(data, dict) and "id" in data:
        ids.append(str(data["id"]))
    elif isinstance(data, list):
        ids.extend(
            str(item["id"])
            for item in data[:MAX_AUDITED_ENTITIES]
            if isinstance(item, dict) and "id" in item
        )
    return list(dict.fromkeys(ids))[:MAX_AUDITED_ENTITIES]


def _authenticated_user(request: HttpRequest) -> Any:
    # request.user may still be Django's lazy session user; resolving it needs the
    # database, which may be the reason this request failed.
    try:
        user = getattr(request, "user", None)
        if isinstance(user, get_user_model()) and user.is_authenticated:
            return user
    except Exception:
        return None
    return None


def _ip_address(value: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address(value or ""))
    except ValueError:
        return None


class AuditMiddleware:
    """Writes one AuditRecord per /v1 request.

    The row is recorded when the response is closed: in a web process it joins the
    process's batch (omniva/audit.py), so the client never waits for a write.
    """

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not is_api_path(request.path):
            return self.get_response(request)
        started_at = timezone.now()
        started = time.perf_counter()
        response = self.get_response(request)

        key = getattr(request, "auth", None)
        fields = {
            "request_id": getattr(request, "request_id", ""),
            "at": started_at,
            "api_key": key if isinstance(key, ApiKey) else None,
            "key_name": key.name if isinstance(key, ApiKey) else "",
            "user": _authenticated_user(request),
            "method": request.method or "",
            "path": request.path[:2000],
            "remote_addr": _ip_address(request.META.get("REMOTE_ADDR")),
            "entity_ids": _touched_entities(request, response),
        }
        # HttpResponse.close() runs this, before request_finished: in a web process
        # when the response is ready (the row joins the process's batch, omniva/audit.py),
        # elsewhere after it was sent. A parked response (omniva.api.parking) is closed
        # once it has its final answer, so the status and duration are read then.
        # Django's list of what close() runs; not in the stubs.
        response._resource_closers.append(  # type: ignore[attr-defined]
            partial(_record, response, started, fields)
        )
        return response


def _record(response: HttpResponse, started: float, fields: dict[str, Any]) -> None:
    fields["status"] = response.status_code
    fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
    audit.record(fields)


class AdminMessagesMiddleware(MessageMiddleware):
    """Django's messages, for the admin and the dashboard only: an API request never
    shows a message, and setting up message storage (a signer per request) was 5% of a
    web process's CPU on a cheap endpoint."""

    def process_request(self, request: HttpRequest) -> None:
        if not is_api_path(request.path):
            super().process_request(request)
