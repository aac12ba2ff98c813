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
    "503": "The database is unavailable (SERVICE_UNAVAILABLE); see Retry-After.",
}
# Any operation with a path parameter: the thing it names may not exist.
NOT_FOUND = "No such resource (<THING>_NOT_FOUND, or NOT_FOUND for a malformed id)."
# Any write: a duplicate name, or a state that does not allow the change.
CONFLICT = "Conflicts with the current state (CONFLICT, ENGINE_ALREADY_REGISTERED, JOB_…)."
WRITE_METHODS = frozenset({"post", "put", "patch", "delete"})
# Read-only fields some answers leave out; drf-spectacular marks every read-only field
# required. A job has an estimate only while it waits or runs, and only alone.
SOMETIMES_ABSENT: dict[str, tuple[str, ...]] = {"Job": ("estimated_completion_ms",)}


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
    for name, fields in SOMETIMES_ABSENT.items():
        component = schemas.get(name, {})
        if "required" in component:
            component["required"] = [f for f in component["required"] if f not in fields]

    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
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
            for parameter in operation.get("parameters", []):
                # DRF reads an empty optional query value as not given.
                if parameter.get("in") == "query" and not parameter.get("required"):
                    parameter["allowEmptyValue"] = True
            errors = dict(COMMON_ERRORS)
            if any(p.get("in") == "path" for p in operation.get("parameters", [])):
                errors["404"] = NOT_FOUND
            if method in WRITE_METHODS:
                errors["409"] = CONFLICT
            for status, description in errors.items():
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
