"""`printify` (REST v1): a product tagged `omniva-<key>`, found again by its tag."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from publishing.adapters.core import (
    IDEMPOTENCY_HEADER,
    AdapterError,
    Item,
    Published,
    _config_id,
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
