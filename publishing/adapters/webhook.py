"""`webhook`: a signed JSON POST with the idempotency key."""

from __future__ import annotations

import json

from omniva import outbound
from publishing.adapters.core import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    AdapterError,
    Item,
    Published,
    signature,
)
from publishing.models import Destination


def _webhook(destination: Destination, item: Item, key: str) -> Published:
    url = str(destination.config.get("url") or "")
    if not url:
        raise AdapterError("The webhook destination has no `url`.", transient=False)
    body = json.dumps(
        {"idempotency_key": key, "destination": str(destination.pk), "item": item.data},
        sort_keys=True,
    ).encode()
    headers = {IDEMPOTENCY_HEADER: key}
    secret = destination.secrets.get("secret")
    if secret:
        headers[SIGNATURE_HEADER] = signature(str(secret), body)
    try:
        answer = outbound.send(
            "POST", url, body=body, content_type="application/json", headers=headers
        )
    except outbound.OutboundError as exc:
        raise AdapterError(exc.message, transient=exc.transient, code=exc.code.value) from exc
    try:
        reply = json.loads(answer.body or b"{}")
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        reply = {}
    return Published(external_id=str(reply.get("id") or key), url=str(reply.get("url") or ""))
