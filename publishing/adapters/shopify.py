"""`shopify` (Admin REST): a product with the handle `omniva-<key[:40]>`, found again by
its handle."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode, urlsplit

from django.utils.html import linebreaks

from publishing.adapters.core import (
    AdapterError,
    Item,
    Published,
    _config_text,
    _description,
    _file_base64,
    _price,
    _secret,
    _tags,
    _title,
)
from publishing.adapters.platform_api import _PlatformApi
from publishing.models import Destination

SHOPIFY_API_VERSION = "2024-10"
SHOPIFY_TOKEN_HEADER = "X-Shopify-Access-Token"  # noqa: S105 (a header name)
_SHOP_HOST = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+$")
_SHOPIFY_VERSION = re.compile(r"^(?:\d{4}-\d{2}|unstable)$")


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
