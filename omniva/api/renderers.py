"""Renderers that wrap every DRF response in the envelope, for JSON and the browsable API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.response import Response

from omniva.api.envelope import envelope, error_body


class EnvelopeResponse(Response):
    """A Response that carries envelope parts beside its data.

    `meta` is merged into the envelope's meta (pagination); `error` marks a response
    that has both data and an error (an unhealthy health report).
    """

    def __init__(
        self,
        data: Any = None,
        status: int | None = None,
        *,
        meta: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(data, status=status, headers=headers)
        self.envelope_meta = meta or {}
        self.envelope_error = error


def wrap(data: Any, renderer_context: Mapping[str, Any] | None) -> dict[str, Any]:
    context = renderer_context or {}
    response = context.get("response")
    request = context.get("request")
    meta = getattr(response, "envelope_meta", None)
    explicit_error = getattr(response, "envelope_error", None)
    if explicit_error is not None:
        return envelope(request=request, data=data, error=explicit_error, meta=meta)
    if response is not None and response.status_code >= 400:
        # The exception handler renders {code, message, details?}; anything else that
        # reached here as an error is wrapped so the envelope still holds a code.
        if isinstance(data, dict) and {"code", "message"} <= data.keys():
            error = data
        else:
            error = error_body("ERROR", "The request failed.", data)
        return envelope(request=request, error=error, meta=meta)
    return envelope(request=request, data=data, meta=meta)


class EnvelopeJSONRenderer(JSONRenderer):
    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        return super().render(wrap(data, renderer_context), accepted_media_type, renderer_context)


class EnvelopeBrowsableAPIRenderer(BrowsableAPIRenderer):
    """The browsable API; its content comes from the first renderer, the envelope one."""

    def get_default_renderer(self, view: Any) -> JSONRenderer:
        return EnvelopeJSONRenderer()
