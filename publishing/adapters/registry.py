"""Which adapter publishes to which kind of destination, and `publish`, which keeps a
destination's secrets out of the errors it raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from publishing.adapters.core import AdapterError, Item, Published
from publishing.adapters.directory import _directory
from publishing.adapters.printify import _printify
from publishing.adapters.s3 import _s3
from publishing.adapters.shopify import _shopify
from publishing.adapters.webhook import _webhook
from publishing.models import Destination, DestinationKind


def publish(destination: Destination, item: Item, key: str) -> Published:
    adapter = _ADAPTERS.get(destination.kind)
    if adapter is None:
        raise AdapterError(f"Publishing to {destination.kind} is not available.", transient=False)
    try:
        return adapter(destination, item, key)
    except AdapterError as exc:
        cleaned = _without_secrets(exc.message, destination.secrets)
        if cleaned == exc.message:
            raise
        # Not chained: the original, with the secret in it, must not travel on.
        raise AdapterError(cleaned, transient=exc.transient, code=exc.code) from None


def _without_secrets(message: str, secrets: dict[str, Any]) -> str:
    for value in secrets.values():
        text = str(value) if value is not None else ""
        if len(text) >= 4:
            message = message.replace(text, "[secret]")
    return message


_ADAPTERS: dict[str, Callable[[Destination, Item, str], Published]] = {
    DestinationKind.WEBHOOK: _webhook,
    DestinationKind.DIRECTORY: _directory,
    DestinationKind.S3: _s3,
    DestinationKind.PRINTIFY: _printify,
    DestinationKind.SHOPIFY: _shopify,
}
