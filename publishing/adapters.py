"""Platform adapters: each sends one item to one destination, with the publication's
idempotency key, and says what the platform calls it.

- `webhook`: a JSON POST to `config.url`, signed with HMAC-SHA256 of the body under
  `secrets.secret` (`X-Omniva-Signature: sha256=<hex>`), with `Idempotency-Key`.
  Outbound through omniva/outbound.py: private addresses are refused unless allowed.
- `directory`: the item's JSON and its file, named by the key, in `config.path` under
  OMNIVA_PUBLISH_ROOT (written to a temporary name, then renamed: a reader never sees
  half a file, and writing the same key again replaces it with the same content).

S3, Printify and Shopify come with the rest of the content issue.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings

from omniva import outbound
from publishing.models import Destination, DestinationKind

SIGNATURE_HEADER = "X-Omniva-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"


class AdapterError(Exception):
    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class Item:
    """What is published: its JSON description, and the file that goes with it."""

    data: dict[str, Any]
    file: Path | None = None


@dataclass(frozen=True)
class Published:
    external_id: str
    url: str = ""


def publish(destination: Destination, item: Item, key: str) -> Published:
    if destination.kind == DestinationKind.WEBHOOK:
        return _webhook(destination, item, key)
    if destination.kind == DestinationKind.DIRECTORY:
        return _directory(destination, item, key)
    raise AdapterError(f"Publishing to {destination.kind} is not available yet.", transient=False)


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


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
        raise AdapterError(exc.message, transient=exc.transient) from exc
    try:
        reply = json.loads(answer.body or b"{}")
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        reply = {}
    return Published(external_id=str(reply.get("id") or key), url=str(reply.get("url") or ""))


def publish_root() -> Path:
    return Path(settings.OMNIVA_PUBLISH_ROOT)


def _directory(destination: Destination, item: Item, key: str) -> Published:
    relative = PurePosixPath(str(destination.config.get("path") or "."))
    if relative.is_absolute() or ".." in relative.parts:
        raise AdapterError(
            "A directory destination's `path` must stay under the publish root.", transient=False
        )
    folder = publish_root() / relative
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if item.file is not None:
            _write_atomically(folder / f"{key}{item.file.suffix}", item.file)
        # The description last: its presence says the item is complete.
        _write_atomically(folder / f"{key}.json", json.dumps(item.data, sort_keys=True).encode())
    except OSError as exc:  # a full disk, a permission: the retry may succeed
        raise AdapterError(f"Writing to {relative} failed: {exc.strerror or exc}") from exc
    return Published(external_id=key, url=str(relative / f"{key}.json"))


def _write_atomically(path: Path, content: bytes | Path) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as temporary:
        if isinstance(content, Path):
            with content.open("rb") as source:
                shutil.copyfileobj(source, temporary)
        else:
            temporary.write(content)
    os.replace(temporary.name, path)
