"""Seed 004's `api_call` as a pipeline: one outbound HTTP request
(omniva.outbound.request: SSRF guard, size and time limits) with GET, HEAD, POST, PUT,
PATCH or DELETE, retrying connection failures, timeouts, 5xx, 408 and 429 inside the
stage with a short backoff before it hands the failure to the engine's retries; any
other answer, 4xx included, is the result with its status, headers and body.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

from django.conf import settings

from jobs.pipelines.context import StageContext, StageError
from jobs.pipelines.data_analysis import INPUT_TOO_LARGE, INVALID_INPUT, _refuse_constant
from jobs.pipelines.registry import Pipeline, Stage, register
from omniva import outbound

API_CALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
API_CALL_BODY_METHODS = ("POST", "PUT", "PATCH")
API_CALL_MAX_TIMEOUT_S = 120.0
API_CALL_MAX_RESPONSE_BYTES = 1024 * 1024
API_CALL_MAX_REQUEST_BYTES = 1024 * 1024
# Tries inside one attempt of the stage, and the pauses between them; after the last
# the engine's own retries (30, 60, 120 s) take over.
API_CALL_TRIES = 3
API_CALL_BACKOFF_S = (0.5, 1.0)
# How often a pause between tries looks for a cancel.
API_CALL_CHECK_EVERY_S = 0.25
# A header name is an RFC 9110 token; the ones outbound sets itself cannot be given.
_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$"
_MANAGED_HEADER = r"(?i)^(host|content-length|transfer-encoding|connection)$"
_HEADER_VALUE = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"
_TEXT_TYPES = re.compile(
    r"^(text/.+|application/(xml|javascript|x-www-form-urlencoded|.+\+xml))$", re.IGNORECASE
)

API_CALL_PARAMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "minLength": 1, "maxLength": 2048},
        "method": {"enum": list(API_CALL_METHODS)},
        "headers": {
            "type": "object",
            "maxProperties": 50,
            "propertyNames": {"pattern": _HEADER_NAME, "not": {"pattern": _MANAGED_HEADER}},
            "additionalProperties": {"type": "string", "maxLength": 8192, "pattern": _HEADER_VALUE},
        },
        "json": {},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": API_CALL_MAX_TIMEOUT_S},
    },
    "required": ["url"],
    "additionalProperties": False,
    # A JSON body needs a method that sends one.
    "if": {"required": ["json", "method"]},
    "then": {"properties": {"method": {"enum": list(API_CALL_BODY_METHODS)}}},
}


def _decoded_body(body: bytes, content_type: str | None) -> tuple[Any, str]:
    """(body, encoding): parsed JSON for a JSON media type, text for textual ones (or
    none given) that decode, base64 for the rest."""
    media_type, _, parameters = (content_type or "").partition(";")
    media_type = media_type.strip().lower()
    charset = "utf-8"
    for parameter in parameters.split(";"):
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "charset" and value:
            charset = value.strip('"')
    try:
        text = body.decode(charset)
    except (LookupError, UnicodeDecodeError):
        text = None
    # jsonb holds no NUL character; such a body goes as base64.
    if text is not None and "\x00" not in text and "\\u0000" not in text:
        if media_type == "application/json" or media_type.endswith("+json"):
            try:
                return json.loads(text, parse_constant=_refuse_constant), "json"
            except (ValueError, RecursionError):
                pass
        if not media_type or _TEXT_TYPES.match(media_type) or media_type.endswith("json"):
            return text, "text"
    return base64.b64encode(body).decode("ascii"), "base64"


def _answer(fetched: outbound.Fetched, method: str) -> dict[str, Any]:
    if method == "HEAD":  # the answer to a HEAD has no body, whatever it says
        decoded, encoding = None, None
    else:
        decoded, encoding = _decoded_body(fetched.body, fetched.content_type)
    return {
        "status": fetched.status,
        # jsonb holds no NUL character; a header carrying one is left out.
        "headers": {
            name: value
            for name, value in fetched.headers.items()
            if "\x00" not in name and "\x00" not in value
        },
        "body": decoded,
        "body_encoding": encoding,
        "url": fetched.final_url,
    }


def _worth_another_try(exc: outbound.OutboundError) -> bool:
    # outbound counts a refused connection as permanent (right for a fetched input);
    # an API being restarted refuses connections for a moment, and seed 004 retries
    # connection errors.
    return exc.transient or isinstance(exc.__cause__, ConnectionRefusedError)


def _pause(ctx: StageContext, seconds: float) -> None:
    """Wait `seconds`, looking for a cancel now and then."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ctx.checkpoint()
        time.sleep(min(left, API_CALL_CHECK_EVERY_S))
    ctx.checkpoint()


def api_call(ctx: StageContext) -> dict[str, Any]:
    """One HTTP request; returns {status, headers, body, body_encoding, url, tries} for
    any answer but those asking to come back later (5xx, 408, 429), which are tried
    again and then fail retryable."""
    params = ctx.params
    url = str(params["url"])
    has_json = "json" in params
    method = str(params.get("method") or ("POST" if has_json else "GET")).upper()
    if method not in API_CALL_METHODS or (has_json and method not in API_CALL_BODY_METHODS):
        raise StageError(INVALID_INPUT, f"Method {method} cannot be used here.", retryable=False)
    headers = {str(k): str(v) for k, v in (params.get("headers") or {}).items()}
    body: bytes | None = None
    content_type: str | None = None
    if has_json:
        try:
            body = json.dumps(params["json"], allow_nan=False).encode()
        except ValueError as exc:
            raise StageError(
                INVALID_INPUT, f"`json` is not valid JSON: {exc}", retryable=False
            ) from exc
        if len(body) > API_CALL_MAX_REQUEST_BYTES:
            raise StageError(
                INPUT_TOO_LARGE,
                f"The JSON body is over {API_CALL_MAX_REQUEST_BYTES} bytes.",
                retryable=False,
            )
        # The caller's Content-Type (application/merge-patch+json, say) names the body.
        content_type = "application/json"
        for name in [name for name in headers if name.lower() == "content-type"]:
            content_type = headers.pop(name)
    timeout_s = min(
        float(params.get("timeout_s") or settings.OMNIVA_FETCH_TIMEOUT_S), API_CALL_MAX_TIMEOUT_S
    )
    for attempt in range(1, API_CALL_TRIES + 1):
        ctx.checkpoint()
        try:
            fetched = outbound.request(
                method,
                url,
                body=body,
                content_type=content_type,
                headers=headers,
                max_bytes=API_CALL_MAX_RESPONSE_BYTES,
                timeout_s=timeout_s,
                raise_for_status=False,
            )
            come_back_later = fetched.status_error()
            if come_back_later is not None and come_back_later.transient:
                raise come_back_later
        except outbound.OutboundError as exc:
            if not _worth_another_try(exc):
                raise StageError(exc.code, exc.message, retryable=False) from exc
            if attempt == API_CALL_TRIES:
                raise StageError(
                    exc.code, f"{exc.message} (tried {API_CALL_TRIES} times)", retryable=True
                ) from exc
            pause = API_CALL_BACKOFF_S[attempt - 1]
            ctx.log(
                f"try {attempt} failed: {exc.message}; trying again in {pause} s", level="warning"
            )
            _pause(ctx, pause)
            continue
        except ValueError as exc:  # a header outbound or http.client will not send
            raise StageError(INVALID_INPUT, str(exc), retryable=False) from exc
        return {**_answer(fetched, method), "tries": attempt}
    raise AssertionError("unreachable: the last try returns or raises")


API_CALL = register(
    Pipeline(
        name="api_call",
        description="Seed 004's api_call: one outbound HTTP request (GET, HEAD, POST, PUT, "
        "PATCH or DELETE; private and loopback addresses refused unless "
        "OMNIVA_ALLOW_PRIVATE_URLS), retried on connection errors, timeouts, 5xx, 408 and "
        "429 with backoff; any other answer, 4xx included, is the result with its status, "
        "headers and body.",
        stages=(Stage("api_caller", api_call),),
        params_schema=API_CALL_PARAMS_SCHEMA,
    )
)
