"""U+0000 in client text: PostgreSQL stores it in neither text nor jsonb, so a value
carrying it fails at the database with an error no client caused knowingly. It is
refused where requests are parsed (the REST body parser and query strings, the gRPC
servicer's frame), as
400 VALIDATION_ERROR naming where it was, before anything is written."""

from __future__ import annotations

from typing import Any

from omniva.errors import ErrorCode, OmnivaError

NULL = "\x00"
MESSAGE = "Text may not contain the null character (U+0000)."


def null_character_path(value: Any, *, root: str = "") -> str | None:
    """Where parsed JSON `value` holds U+0000 in a string or a key: a dotted path
    (`params.items.2.text`; the object's own path for a key), `root` or "body" for the
    whole value; None where it holds none. Iterative: a body may nest deeply."""
    pending: list[tuple[str, Any]] = [(root, value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if NULL in item:
                return path or "body"
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                if NULL in str(key):
                    return path or "body"
                pending.append((f"{path}.{key}" if path else str(key), child))
        elif isinstance(item, list | tuple):
            for index in reversed(range(len(item))):
                pending.append((f"{path}.{index}" if path else str(index), item[index]))
    return None


def refuse_null_character(value: Any, *, root: str = "") -> None:
    """Raise 400 VALIDATION_ERROR naming where `value` holds U+0000, if it does."""
    path = null_character_path(value, root=root)
    if path is not None:
        raise OmnivaError(ErrorCode.VALIDATION_ERROR, MESSAGE, details={path: [MESSAGE]})
