"""limit/offset pagination whose numbers go into `meta.pagination`.

Unlike DRF's default, a bad `limit` or `offset` is a 400 VALIDATION_ERROR rather than
silently replaced: a client asking for 10,000 rows should learn the maximum is 500.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request

from omniva.api.renderers import EnvelopeResponse

MAX_OFFSET = 2**31 - 1


def _bounded_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError({name: [f"{name} must be an integer."]}) from None
    if not minimum <= value <= maximum:
        raise ValidationError({name: [f"{name} must be between {minimum} and {maximum}."]})
    return value


class EnvelopePagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 500

    def get_limit(self, request: Request) -> int:
        return _bounded_int(request, self.limit_query_param, self.default_limit, 1, self.max_limit)

    def get_offset(self, request: Request) -> int:
        return _bounded_int(request, self.offset_query_param, 0, 0, MAX_OFFSET)

    def get_paginated_response(self, data: Any) -> EnvelopeResponse:
        return EnvelopeResponse(
            data,
            meta={
                "pagination": {
                    "limit": self.limit,
                    "offset": self.offset,
                    "count": self.count,
                    "next": self.get_next_link(),
                    "previous": self.get_previous_link(),
                }
            },
        )

    def get_paginated_response_schema(self, schema: dict[str, Any]) -> dict[str, Any]:
        # The list itself is `data`; the envelope hook adds meta.pagination.
        return schema
