"""JSON over omniva.outbound to a platform's REST API (Printify, Shopify), its failures
as AdapterErrors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from omniva import outbound
from publishing.adapters.core import AdapterError


def _outbound_failure(platform: str, exc: outbound.OutboundError) -> AdapterError:
    # outbound counts a refused connection as lasting (right for a URL a user typed);
    # a platform's API refusing connections is an outage that passes.
    transient = exc.transient or isinstance(exc.__cause__, ConnectionError)
    code = exc.code.value
    if exc.status in (401, 403):
        return AdapterError(
            f"{platform} refused the credentials: {exc.message}", transient=False, code=code
        )
    return AdapterError(f"{platform}: {exc.message}", transient=transient, code=code)


@dataclass(frozen=True)
class _PlatformApi:
    """JSON over outbound to one platform's API, failures as AdapterErrors. Redirects are
    not followed: outbound drops only the standard credential headers when one leaves
    the origin, and Shopify's token travels in a header of its own."""

    platform: str
    base: str
    headers: dict[str, str] = field(default_factory=dict)

    def get(self, path: str) -> dict[str, Any]:
        try:
            answer = outbound.fetch(self.base + path, headers=self._headers(), max_redirects=0)
        except outbound.OutboundError as exc:
            raise _outbound_failure(self.platform, exc) from exc
        return self._json(answer)

    def post(
        self, path: str, body: dict[str, Any], *, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        try:
            answer = outbound.send(
                "POST",
                self.base + path,
                body=json.dumps(body).encode(),
                content_type="application/json",
                headers=self._headers() | (headers or {}),
                max_redirects=0,
            )
        except outbound.OutboundError as exc:
            raise _outbound_failure(self.platform, exc) from exc
        return self._json(answer)

    def _headers(self) -> dict[str, str]:
        return {"Accept": "application/json", **self.headers}

    def _json(self, answer: outbound.Fetched) -> dict[str, Any]:
        try:
            reply = json.loads(answer.body or b"{}")
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise AdapterError(f"{self.platform} sent an answer that is not a JSON object.")
        return reply
