"""Platform adapters: each sends one item to one destination, with the publication's
idempotency key, and says what the platform calls it.

An item's file is a name in the media storage (a folder or a bucket, omniva/media.py);
an adapter gets a local copy of it only while it sends (`artifact_local`). Every
HTTP request goes through omniva.outbound (private addresses refused unless allowed,
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

The package: `core` (Item, Published, AdapterError, secrets, what adapters share),
`platform_api` (JSON over outbound), one module per kind (`webhook`, `directory`, `s3`,
`printify`, `shopify`) and `registry` (`publish`); this package re-exports the names
callers use, so they write `from publishing import adapters` and `adapters.publish(...)`.
"""

from __future__ import annotations

from publishing.adapters.core import (
    IDEMPOTENCY_HEADER,
    SECRET_WORDS,
    SECRETS_OF_KIND,
    SIGNATURE_HEADER,
    STORAGE_ERRORS,
    AdapterError,
    Item,
    Published,
    secrets_in_config,
    signature,
)
from publishing.adapters.directory import publish_root
from publishing.adapters.printify import (
    PRINTIFY_API_BASE,
    PRINTIFY_MAX_PAGES,
    PRINTIFY_PAGE_SIZE,
    PRINTIFY_PUBLISH_FLAGS,
)
from publishing.adapters.registry import publish
from publishing.adapters.s3 import S3_CLIENT_CONFIG
from publishing.adapters.shopify import SHOPIFY_API_VERSION, SHOPIFY_TOKEN_HEADER

__all__ = [
    "IDEMPOTENCY_HEADER",
    "PRINTIFY_API_BASE",
    "PRINTIFY_MAX_PAGES",
    "PRINTIFY_PAGE_SIZE",
    "PRINTIFY_PUBLISH_FLAGS",
    "S3_CLIENT_CONFIG",
    "SECRETS_OF_KIND",
    "SECRET_WORDS",
    "SHOPIFY_API_VERSION",
    "SHOPIFY_TOKEN_HEADER",
    "SIGNATURE_HEADER",
    "STORAGE_ERRORS",
    "AdapterError",
    "Item",
    "Published",
    "publish",
    "publish_root",
    "secrets_in_config",
    "signature",
]
