"""Row ids written by clients (URL paths, query strings, gRPC metadata, admin search).

`str.isdigit` is the wrong guard for `int()`: it admits digits `int` refuses ("³",
superscripts, circled digits), and a path like `/v1/events/³` answered 500. Only ASCII
digits, few enough for a bigint, are a row id.
"""

from __future__ import annotations

# 18 digits always fit a signed 64-bit integer (19 may not).
MAX_DIGITS = 18


def is_row_id(text: str) -> bool:
    return 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()


def row_id(text: str) -> int | None:
    """The id `text` spells, or None when it spells none."""
    return int(text) if is_row_id(text) else None
