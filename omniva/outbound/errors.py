"""What a refused or failed outbound request raises: `OutboundError`, with a stable
`OutboundCode` and whether trying again later can help."""

from __future__ import annotations

from enum import StrEnum


class OutboundCode(StrEnum):
    URL_NOT_ALLOWED = "URL_NOT_ALLOWED"
    FETCH_FAILED = "FETCH_FAILED"
    FETCH_UNAVAILABLE = "FETCH_UNAVAILABLE"
    FETCH_TOO_LARGE = "FETCH_TOO_LARGE"
    PATH_NOT_ALLOWED = "PATH_NOT_ALLOWED"
    FILE_NOT_FOUND = "FILE_NOT_FOUND"


# Only a server that is there but busy or slow can answer differently later; an address
# that is refused, unreachable or answers 4xx will not.
_TRANSIENT_CODES = frozenset({OutboundCode.FETCH_UNAVAILABLE})


class OutboundError(Exception):
    """A refused or failed outbound request; `code` is one of `OutboundCode`.

    `transient` says whether the same request may succeed later (timeouts, resets, 5xx,
    429); `status` is the HTTP status when the failure is the server's answer.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        transient: bool | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = OutboundCode(code)
        self.message = message
        self.transient = self.code in _TRANSIENT_CODES if transient is None else transient
        self.status = status

    def __repr__(self) -> str:
        return f"OutboundError({self.code.value!r}, {self.message!r})"
