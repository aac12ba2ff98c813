"""`s3` (boto3): the item's file and JSON in a bucket, with the destination's own
credentials; an S3-compatible endpoint must pass the outbound address check."""

from __future__ import annotations

import json
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from omniva import outbound
from publishing.adapters.core import (
    AdapterError,
    Item,
    Published,
    _config_text,
    _local_file,
    _secret,
)
from publishing.models import Destination

# Short, and one retry only: a slow store should fail this attempt and be retried by the
# job's backoff, not hold a worker for minutes inside botocore.
S3_CLIENT_CONFIG = BotoConfig(
    connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}
)
_S3_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
)


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
