"""The request body parser of /v1."""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from omniva.null_character import refuse_null_character


class JsonBodyParser(JSONParser):
    """DRF's JSON parser, with a body nested too deeply for json.loads (it recurses once
    per level) refused as malformed instead of crashing the request, and text holding
    U+0000 refused as invalid (omniva/null_character.py)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("The body is nested too deeply.") from None
        refuse_null_character(data)
        return data
