"""Platform adapters: each sends one item to one destination, with the publication's
idempotency key, and says what the platform calls it.

An item's file is a name in the media storage (a folder or a bucket, omniva/media.py);
an adapter gets a local copy of it only while it sends (`artifact_local`). Every
HTTP request goes through omniva/outbound.py (private addresses refused unless allowed,
timeouts, size limits). Failures are AdapterErrors: transient (5xx, 429, timeouts,
broken or refused connections: the stage retries with backoff) or not (4xx, a bad
config); their messages never carry a destination's secrets.

- `webhook`: a JSON POST to `config.url`, signed with HMAC-SHA256 of the body under
  `secrets.secret` (`X-Omniva-Signature: sha256=<hex>`), with `Idempotency-Key`.
- `directory`: the item's JSON and its file, named by the key, in `config.path` under
  OMNIVA_PUBLISH_ROOT (written to a temporary name, then renamed: a reader never sees
  half a file, and writing the same key again replaces it with the same content).
- `s3` (boto3): the file as `<prefix>/<key><ext>` and the JSON as `<prefix>/<key>.json`
  (last) in `config.bucket`; sending the key again overwrites the same objects.
  `config.endpoint_url` (an S3-compatible store) must pass the outbound address check.
  Credentials only from `secrets` (`access_key_id`, `secret_access_key`), never the
  server's own, so a destination cannot write with the server's role.
- `printify` (REST v1, `secrets.api_token`): a product tagged `omniva-<key>`; the shop's
  products are searched for the tag first, so a product made by an attempt whose
  answer was lost is found (and published if it is not yet) instead of made again.
- `shopify` (Admin REST, `secrets.access_token`): a product with the handle
  `omniva-<key[:40]>`, looked up by handle before it is made.

An item's `price` (payload) is an amount in the shop's currency (`24.99`); Printify's
`config.price` is in cents and wins over it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import mimetypes
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from django.conf import settings
from django.utils.html import linebreaks

from omniva import media, outbound
from omniva.errors import OmnivaError
from omniva.row_ids import is_row_id
from publishing.models import Destination, DestinationKind

SIGNATURE_HEADER = "X-Omniva-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
PRINTIFY_API_BASE = "https://api.printify.com"
PRINTIFY_PAGE_SIZE = 50  # the most Printify returns per page
PRINTIFY_MAX_PAGES = 1000
PRINTIFY_PUBLISH_FLAGS = {
    "title": True,
    "description": True,
    "images": True,
    "variants": True,
    "tags": True,
    "keyFeatures": True,
    "shipping_template": True,
}
SHOPIFY_API_VERSION = "2024-10"
SHOPIFY_TOKEN_HEADER = "X-Shopify-Access-Token"  # noqa: S105 (a header name)
# Short, and one retry only: a slow store should fail this attempt and be retried by the
# job's backoff, not hold a worker for minutes inside botocore.
S3_CLIENT_CONFIG = BotoConfig(
    connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
)
_S3_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
)
# What a storage backend raises when it cannot be read (botocore's for a bucket).
STORAGE_ERRORS = (OSError, BotoCoreError, ClientError)
_SHOP_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+$")
_SHOPIFY_VERSION = re.compile(r"^(?:\d{4}-\d{2}|unstable)$")


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


# --- shared parts ----------------------------------------------------------------------


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


# --- webhook -----------------------------------------------------------------------------


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


# --- directory ---------------------------------------------------------------------------


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
        with _local_file(item) as path:
            if path is not None:
                _write_atomically(folder / f"{key}{item.suffix}", path)
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


# --- s3 ----------------------------------------------------------------------------------


def _s3(destination: Destination, item: Item, key: str) -> Published:
    bucket = _config_text(destination, "bucket")
    prefix = _config_text(destination, "prefix", required=False).strip("/")
    endpoint = _config_text(destination, "endpoint_url", required=False)
    if endpoint:
        _check_endpoint(endpoint)
    client = boto3.session.Session().client(
        "s3",
        region_name=_config_text(destination, "region", required=False) or None,
        endpoint_url=endpoint or None,
        aws_access_key_id=_secret(destination, "access_key_id"),
        aws_secret_access_key=_secret(destination, "secret_access_key"),
        config=S3_CLIENT_CONFIG,
    )
    if endpoint:
        client.meta.events.register_first("needs-retry.s3", _no_region_redirect)
    folder = f"{prefix}/" if prefix else ""
    description_key = f"{folder}{key}.json"
    object_key = description_key
    try:
        with _local_file(item) as path:
            if path is not None:
                object_key = f"{folder}{key}{item.suffix}"
                with path.open("rb") as body:
                    client.put_object(
                        Bucket=bucket, Key=object_key, Body=body, ContentType=item.content_type
                    )
        # The description last: its presence says the item is complete.
        client.put_object(
            Bucket=bucket,
            Key=description_key,
            Body=json.dumps(item.data, sort_keys=True).encode(),
            ContentType="application/json",
        )
    except ClientError as exc:
        raise _s3_failure(exc, bucket) from exc
    except (BotoConnectionError, HTTPClientError) as exc:
        raise AdapterError(f"S3 could not be reached: {exc}") from exc
    except BotoCoreError as exc:
        raise AdapterError(f"S3 refused the request: {exc}", transient=False) from exc
    finally:
        client.close()
    return Published(external_id=object_key, url=f"s3://{bucket}/{object_key}")


def _no_region_redirect(request_dict: dict[str, Any], **kwargs: Any) -> None:
    """Turn botocore's S3 region redirects off for an endpoint of the user's choosing.

    On a 301, 302 or 307 without the bucket's region, botocore asks for the region with
    a HEAD of the bucket, whose own redirect asks again: a store that redirects every
    request made the adapter recurse until RecursionError (some 80 requests, and a
    publication left `publishing`). Marking the request as redirected already, before
    botocore's handler looks, makes such an answer the request's error. The regions
    are AWS's; an S3-compatible store has none to redirect to."""
    context = request_dict.get("context") or {}
    if isinstance(context.get("s3_redirect"), dict):
        context["s3_redirect"]["redirected"] = True


def _s3_failure(exc: ClientError, bucket: str) -> AdapterError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    message = str(error.get("Message") or "")
    transient = status >= 500 or status in (408, 429) or code in _S3_TRANSIENT_CODES
    said = f"S3 answered {code or status} for bucket {bucket!r}"
    return AdapterError(f"{said}: {message}" if message else said, transient=transient)


def _check_endpoint(url: str) -> None:
    """An S3-compatible endpoint is a user-given URL like any other: refused as outbound
    refuses one (not plain http(s), or any of its addresses private, loopback,
    link-local or reserved, unless OMNIVA_ALLOW_PRIVATE_URLS). botocore resolves the name
    again when it connects, so a name whose DNS answer changes in between is not caught
    here, unlike outbound's own requests, which connect to the address they checked."""
    try:
        outbound.check(url)
    except outbound.OutboundError as exc:
        raise AdapterError(
            f"The s3 `endpoint_url`: {exc.message}", transient=exc.transient, code=exc.code.value
        ) from exc


# --- printify ----------------------------------------------------------------------------


def _printify(destination: Destination, item: Item, key: str) -> Published:
    token = _secret(destination, "api_token")
    shop = _config_id(destination, "shop_id")
    blueprint = _config_id(destination, "blueprint_id")
    provider = _config_id(destination, "print_provider_id")
    variants = destination.config.get("variants")
    if (
        not isinstance(variants, list)
        or not variants
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in variants)
    ):
        raise AdapterError(
            "The printify destination needs `variants` (a list of variant ids).", transient=False
        )
    if not item.is_image:
        raise AdapterError(
            "A Printify product needs an image file (a design); this item has none.",
            transient=False,
        )
    price = _printify_price(destination, item)
    base = _config_text(destination, "api_base", required=False) or PRINTIFY_API_BASE
    api = _PlatformApi("Printify", base.rstrip("/"), {"Authorization": f"Bearer {token}"})
    tag = f"omniva-{key}"
    product = _printify_find(api, shop, tag)
    if product is None:
        printed = Item(data=item.data, file=item.print_file) if item.print_file else item
        upload = api.post(
            "/v1/uploads/images.json",
            {"file_name": f"{key}{printed.suffix}", "contents": _file_base64(printed)},
        )
        if not upload.get("id"):
            raise AdapterError("Printify did not say which image it stored.")
        product = api.post(
            f"/v1/shops/{shop}/products.json",
            {
                "title": _title(item),
                "description": _description(item),
                "tags": [*_tags(item), tag],
                "blueprint_id": blueprint,
                "print_provider_id": provider,
                "variants": [{"id": v, "price": price, "is_enabled": True} for v in variants],
                "print_areas": [
                    {
                        "variant_ids": variants,
                        "placeholders": [
                            {
                                "position": "front",
                                "images": [
                                    {"id": upload["id"], "x": 0.5, "y": 0.5, "scale": 1, "angle": 0}
                                ],
                            }
                        ],
                    }
                ],
            },
            headers={IDEMPOTENCY_HEADER: key},
        )
    product_id = str(product.get("id") or "")
    if not product_id:
        raise AdapterError("Printify did not say which product it made.")
    # A product found by its tag may come from an attempt that died before publishing it.
    # Locked means a publish is under way; `external` means the sales channel has it.
    if not (product.get("is_locked") or product.get("external")):
        api.post(
            f"/v1/shops/{shop}/products/{quote(product_id, safe='')}/publish.json",
            PRINTIFY_PUBLISH_FLAGS,
        )
    external = product.get("external")
    url = str(external.get("handle") or "") if isinstance(external, dict) else ""
    return Published(external_id=product_id, url=url)


def _printify_price(destination: Destination, item: Item) -> int:
    configured = destination.config.get("price")
    if configured is not None:
        if not isinstance(configured, int) or isinstance(configured, bool) or configured < 0:
            raise AdapterError(
                "The printify destination's `price` must be a number of cents.", transient=False
            )
        return configured
    amount = _price(item)
    if amount is None:
        raise AdapterError(
            "A Printify product needs a price: the destination's `price` (cents) or the item's.",
            transient=False,
        )
    return int(amount * 100)


def _printify_find(api: _PlatformApi, shop: int, tag: str) -> dict[str, Any] | None:
    """The shop's product carrying `tag`, looked for page by page."""
    for page in range(1, PRINTIFY_MAX_PAGES + 1):
        query = urlencode({"page": page, "limit": PRINTIFY_PAGE_SIZE})
        listed = api.get(f"/v1/shops/{shop}/products.json?{query}")
        products = listed.get("data")
        if not isinstance(products, list) or not products:
            return None
        for product in products:
            if isinstance(product, dict) and tag in (product.get("tags") or []):
                return product
        last_page = listed.get("last_page")
        if not isinstance(last_page, int) or page >= last_page:
            return None
    raise AdapterError("The Printify shop has too many products to search for this one.")


# --- shopify -----------------------------------------------------------------------------


def _shopify(destination: Destination, item: Item, key: str) -> Published:
    token = _secret(destination, "access_token")
    version = _config_text(destination, "api_version", required=False) or SHOPIFY_API_VERSION
    if not _SHOPIFY_VERSION.match(version):
        raise AdapterError(
            "The shopify destination's `api_version` looks like 2024-10.", transient=False
        )
    shop = _config_text(destination, "shop", required=False).lower()
    api_base = _config_text(destination, "api_base", required=False).rstrip("/")
    if shop and not _SHOP_HOST.match(shop):
        raise AdapterError(
            "The shopify destination's `shop` is a host name (my-store.myshopify.com).",
            transient=False,
        )
    if not (shop or api_base):
        raise AdapterError("The shopify destination needs `shop`.", transient=False)
    api = _PlatformApi("Shopify", api_base or f"https://{shop}", {SHOPIFY_TOKEN_HEADER: token})
    store = shop or urlsplit(api_base).netloc
    handle = f"omniva-{key[:40]}"
    products_path = f"/admin/api/{version}/products.json"
    found = api.get(f"{products_path}?{urlencode({'handle': handle, 'fields': 'id,handle'})}")
    product = next(
        (
            p
            for p in found.get("products") or []
            if isinstance(p, dict) and p.get("handle") == handle
        ),
        None,
    )
    if product is None:
        product = _shopify_create(api, products_path, item, key, handle)
    product_id = str(product.get("id") or "")
    if not product_id:
        raise AdapterError("Shopify did not say which product it made.")
    return Published(external_id=product_id, url=f"https://{store}/products/{handle}")


def _shopify_create(
    api: _PlatformApi, path: str, item: Item, key: str, handle: str
) -> dict[str, Any]:
    product: dict[str, Any] = {
        "title": _title(item),
        "body_html": linebreaks(_description(item), autoescape=True),
        "handle": handle,
        "product_type": str(item.data.get("product_type") or ""),
        "tags": ", ".join(_tags(item)),
    }
    price = _price(item)
    if price is not None:
        product["variants"] = [{"price": str(price)}]
    # Product images only: a clip's video would need Shopify's media API.
    if item.is_image:
        product["images"] = [{"attachment": _file_base64(item), "filename": f"{key}{item.suffix}"}]
    created = api.post(path, {"product": product})
    made = created.get("product")
    if not isinstance(made, dict):
        raise AdapterError("Shopify did not say which product it made.")
    return made


_ADAPTERS: dict[str, Callable[[Destination, Item, str], Published]] = {
    DestinationKind.WEBHOOK: _webhook,
    DestinationKind.DIRECTORY: _directory,
    DestinationKind.S3: _s3,
    DestinationKind.PRINTIFY: _printify,
    DestinationKind.SHOPIFY: _shopify,
}
