"""OpenAPI: every response documented as the envelope it really is."""

from __future__ import annotations

from typing import Any

ENVELOPE_META = {
    "type": "object",
    "properties": {
        "request_id": {"type": "string"},
        "generated_at": {"type": "string", "format": "date-time"},
        "pagination": {"$ref": "#/components/schemas/Pagination"},
    },
    "required": ["request_id", "generated_at"],
}
ERROR = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "A stable error code, e.g. VALIDATION_ERROR."},
        "message": {"type": "string"},
        "details": {"type": "object", "additionalProperties": True},
    },
    "required": ["code", "message"],
}
PAGINATION = {
    "type": "object",
    "properties": {
        "limit": {"type": "integer"},
        "offset": {"type": "integer"},
        "count": {"type": "integer"},
        "next": {"type": "string", "format": "uri", "nullable": True},
        "previous": {"type": "string", "format": "uri", "nullable": True},
    },
    "required": ["limit", "offset", "count", "next", "previous"],
}
# The errors any authenticated /v1 operation can answer with.
COMMON_ERRORS = {
    "400": "Malformed request or invalid fields (MALFORMED_REQUEST, VALIDATION_ERROR).",
    "401": "No valid API key (UNAUTHENTICATED).",
    "403": "The key lacks the scope (PERMISSION_DENIED).",
    "413": "The body is over the limit (PAYLOAD_TOO_LARGE).",
    "429": "Over the rate limit (RATE_LIMITED); see Retry-After.",
    "500": "Unexpected server error (INTERNAL_ERROR).",
}


def _success(data_schema: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["success"]},
            "data": data_schema or {"nullable": True},
            "error": {"nullable": True, "enum": [None]},
            "meta": {"$ref": "#/components/schemas/EnvelopeMeta"},
        },
        "required": ["status", "data", "error", "meta"],
    }


def _error_with_data(data_schema: dict[str, Any]) -> dict[str, Any]:
    """An error that still carries data (the health report of an unhealthy service)."""
    return {
        "type": "object",
        "properties": {
            "status": {"type": "string", "enum": ["error"]},
            "data": data_schema,
            "error": {"$ref": "#/components/schemas/Error"},
            "meta": {"$ref": "#/components/schemas/EnvelopeMeta"},
        },
        "required": ["status", "data", "error", "meta"],
    }


ERROR_ENVELOPE = {
    "type": "object",
    "properties": {
        "status": {"type": "string", "enum": ["error"]},
        "data": {"nullable": True},
        "error": {"$ref": "#/components/schemas/Error"},
        "meta": {"$ref": "#/components/schemas/EnvelopeMeta"},
    },
    "required": ["status", "data", "error", "meta"],
}


def wrap_responses_in_envelope(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: wrap each response body in the envelope."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["EnvelopeMeta"] = ENVELOPE_META
    schemas["Error"] = ERROR
    schemas["Pagination"] = PAGINATION
    schemas["ErrorEnvelope"] = ERROR_ENVELOPE
    error_ref = {"$ref": "#/components/schemas/ErrorEnvelope"}

    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            for status, response in list(responses.items()):
                content = response.get("content")
                if status.startswith(("4", "5")):
                    schema = next(iter(content.values())).get("schema") if content else None
                    response["content"] = {
                        "application/json": {
                            "schema": _error_with_data(schema) if schema else error_ref
                        }
                    }
                    continue
                if not content:
                    response["content"] = {"application/json": {"schema": _success(None)}}
                    continue
                for media in content.values():
                    media["schema"] = _success(media.get("schema"))
            for status, description in COMMON_ERRORS.items():
                if "security" not in operation and status in {"401", "403", "429"}:
                    continue  # a public operation
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": error_ref}},
                    },
                )
    return result
