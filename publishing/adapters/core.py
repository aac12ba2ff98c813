"""What every adapter shares: the item and what a send returns, AdapterError, which
secrets a destination has, and reading a destination's config and an item's fields."""

from __future__ import annotations

import base64
import hashlib
import hmac
import mimetypes
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from omniva import media, outbound
from omniva.errors import OmnivaError
from omniva.row_ids import is_row_id
from publishing.models import Destination

SIGNATURE_HEADER = "X-Omniva-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# What a storage backend raises when it cannot be read (botocore's for a bucket).
STORAGE_ERRORS = (OSError, BotoCoreError, ClientError)


class AdapterError(Exception):
    """A failed send; `code` names the cause where it has a stable name (an outbound
    code such as URL_NOT_ALLOWED for a destination URL that leads to a private address),
    and the publication's error carries it as `reason`."""

    def __init__(self, message: str, *, transient: bool = True, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.code = code


@dataclass(frozen=True)
class Item:
    """What is published: its JSON description, and the storage name of the file that
    goes with it (None when there is none; remote media is a URL in `data`)."""

    data: dict[str, Any]
    file: str | None = None
    # What a print-on-demand platform prints, when it is not `file` (a design whose
    # `file` is its mockup).
    print_file: str | None = None

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.file).suffix.lower() if self.file else ""

    @property
    def content_type(self) -> str:
        guessed, _ = mimetypes.guess_type(f"file{self.suffix}")
        return guessed or "application/octet-stream"

    @property
    def is_image(self) -> bool:
        return self.file is not None and self.content_type.startswith("image/")


@dataclass(frozen=True)
class Published:
    external_id: str
    url: str = ""


# The secrets each adapter reads from a destination's `secrets`, and words that make
# any `config` key a secret whatever the kind: `config` is stored and shown as it is.
SECRETS_OF_KIND: dict[str, tuple[str, ...]] = {
    "webhook": ("secret",),
    "s3": ("access_key_id", "secret_access_key"),
    "printify": ("api_token",),
    "shopify": ("access_token",),
    "directory": (),
}
SECRET_WORDS = ("secret", "password", "passwd", "token", "api_key", "apikey", "private_key",
                "access_key", "credential", "signing_key")  # fmt: skip


def secrets_in_config(kind: str, config: dict[str, Any]) -> list[str]:
    """The keys of `config` that are secrets (the adapter's own, or secret-like names)."""
    own = set(SECRETS_OF_KIND.get(kind, ()))
    return sorted(
        key
        for key in config
        if key in own or any(word in str(key).lower().replace("-", "_") for word in SECRET_WORDS)
    )


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@contextmanager
def _local_file(item: Item) -> Iterator[Path | None]:
    """The item's file as a local path while the adapter sends it (a temporary download
    when the storage is a bucket), or None when the item has no file."""
    if item.file is None:
        yield None
        return
    with ExitStack() as stack:
        # Only getting the file is guarded here; what the adapter raises while it sends
        # passes through the yield untouched.
        try:
            path = stack.enter_context(media.artifact_local(item.file))
        except outbound.OutboundError as exc:  # local storage: gone, or not a plain file
            raise AdapterError(
                f"The media file {item.file!r} cannot be read: {exc.message}",
                transient=exc.transient,
            ) from exc
        except OmnivaError as exc:
            raise AdapterError(exc.message, transient=False) from exc
        except STORAGE_ERRORS as exc:
            raise AdapterError(f"Reading the media file {item.file!r} failed: {exc}") from exc
        yield path


def _secret(destination: Destination, name: str) -> str:
    value = destination.secrets.get(name)
    if not isinstance(value, str) or not value:
        raise AdapterError(
            f"The {destination.kind} destination has no `{name}` secret.", transient=False
        )
    return value


def _config_text(destination: Destination, name: str, *, required: bool = True) -> str:
    value = destination.config.get(name)
    if value is None or value == "":
        if required:
            raise AdapterError(
                f"The {destination.kind} destination has no `{name}`.", transient=False
            )
        return ""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise AdapterError(
            f"The {destination.kind} destination's `{name}` must be a string.", transient=False
        )
    return str(value)


def _config_id(destination: Destination, name: str) -> int:
    value = destination.config.get(name)
    if isinstance(value, str) and is_row_id(value):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(
            f"The {destination.kind} destination needs `{name}` (a positive number).",
            transient=False,
        )
    return value


def _title(item: Item) -> str:
    title = str(item.data.get("title") or "").strip()
    if title:
        return title[:255]
    path = str(item.data.get("path") or item.file or "")
    return PurePosixPath(path).stem[:255] or "Untitled"


def _description(item: Item) -> str:
    return str(item.data.get("description") or item.data.get("transcript") or "")


def _tags(item: Item) -> list[str]:
    raw = item.data.get("tags") or []
    if isinstance(raw, str):
        raw = raw.split(",")
    if not isinstance(raw, list):
        return []
    return [str(tag).strip() for tag in raw if str(tag).strip()]


def _price(item: Item) -> Decimal | None:
    """The item's price, an amount in the shop's currency, or None when it has none."""
    raw = item.data.get("price")
    if raw is None or raw == "" or isinstance(raw, bool):
        return None
    try:
        amount = Decimal(str(raw))
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0:
        raise AdapterError(f"The item's price {raw!r} is not an amount.", transient=False)
    return amount.quantize(Decimal("0.01"))


def _file_base64(item: Item) -> str:
    with _local_file(item) as path:
        assert path is not None
        return base64.b64encode(path.read_bytes()).decode("ascii")
