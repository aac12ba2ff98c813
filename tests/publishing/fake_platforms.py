"""Local stand-ins for the platforms the publishing adapters talk to: a fake Printify and
a fake Shopify (ThreadingHTTPServers on 127.0.0.1 that keep products in memory and speak
just the endpoints the adapters call, tokens checked), and moto's S3 in server mode.

Each fake can be told to fail: `fail_next` answers 500 to the next requests,
`hang_up_after_create` keeps the next product made and closes the connection without an
answer (the caller never learns it was made), `redirect_to` answers every request with a
redirect there; the fake Printify's `fail_publish` answers 500 to publish calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

PRINTIFY_TOKEN = "printify-token-5f1d2c"
SHOPIFY_TOKEN = "shpat_0a9b8c7d6e5f"
S3_ACCESS_KEY = "AKIAOMNIVATEST000001"
S3_SECRET_KEY = "s3-secret-key-7e6d5c4b3a"
S3_REGION = "us-east-1"


@dataclass
class Seen:
    """A request a fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any = None


class FakePlatform(ThreadingHTTPServer):
    """A JSON API on a free local port; subclasses route requests in `handle_api`."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.fail_next = 0
        self.hang_up_after_create = 0
        self.redirect_to = ""
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def authorized(self, headers: Any) -> bool:
        raise NotImplementedError

    def handle_api(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        raise NotImplementedError

    def requests_to(self, method: str, pattern: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and re.search(pattern, s.path)]

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class HangUp(Exception):
    """Raised by a route: close the connection without an answer."""


class _Handler(BaseHTTPRequestHandler):
    server: FakePlatform

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._answer(400, {"errors": "body is not JSON"})
            return
        parts = urlsplit(self.path)
        server = self.server
        with server.lock:
            server.seen.append(Seen(method, parts.path, dict(self.headers.items()), body))
            if not server.authorized(self.headers):
                status, answer = 401, {"errors": "Invalid API key or access token"}
            elif server.redirect_to:
                self._answer(302, {}, Location=server.redirect_to)
                return
            elif server.fail_next:
                server.fail_next -= 1
                status, answer = 500, {"errors": "internal error"}
            else:
                try:
                    status, answer = server.handle_api(
                        method, parts.path, parse_qs(parts.query), body
                    )
                except HangUp:
                    self.close_connection = True
                    self.connection.close()
                    return
        self._answer(status, answer)

    def _answer(self, status: int, body: Any, **headers: str) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _decoded(contents: Any) -> bytes | None:
    try:
        return base64.b64decode(str(contents), validate=True)
    except (binascii.Error, ValueError):
        return None


class FakePrintify(FakePlatform):
    """Printify's v1 API for one shop: image uploads, products (listed `page_size` per
    page), publishing. `products` keeps what was made, `uploads` the decoded images."""

    def __init__(self, *, shop_id: int = 4321, page_size: int = 2) -> None:
        super().__init__()
        self.shop_id = shop_id
        self.page_size = page_size
        self.products: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, bytes] = {}
        self.fail_publish = 0
        self.published: list[str] = []  # product ids, one per successful publish call

    def authorized(self, headers: Any) -> bool:
        return headers.get("Authorization") == f"Bearer {PRINTIFY_TOKEN}"

    def add_product(self, title: str, tags: list[str]) -> dict[str, Any]:
        product = {"id": uuid.uuid4().hex[:24], "title": title, "tags": tags, "is_locked": False}
        self.products[product["id"]] = product
        return product

    def handle_api(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        if method == "POST" and path == "/v1/uploads/images.json":
            return self._upload(body)
        shop = re.match(r"^/v1/shops/(\d+)/(.*)$", path)
        if shop is None or int(shop[1]) != self.shop_id:
            return 404, {"errors": "Not found"}
        rest = shop[2]
        if rest == "products.json" and method == "GET":
            return self._list(query)
        if rest == "products.json" and method == "POST":
            return self._create(body)
        publish = re.match(r"^products/([^/]+)/publish\.json$", rest)
        if publish and method == "POST":
            return self._publish(publish[1])
        return 404, {"errors": "Not found"}

    def _upload(self, body: Any) -> tuple[int, Any]:
        contents = _decoded((body or {}).get("contents"))
        if not body.get("file_name") or contents is None:
            return 400, {"errors": "file_name and base64 contents are required"}
        upload_id = uuid.uuid4().hex[:24]
        self.uploads[upload_id] = contents
        return 200, {"id": upload_id, "file_name": body["file_name"], "size": len(contents)}

    def _list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        page = int(query.get("page", ["1"])[0])
        size = min(int(query.get("limit", ["10"])[0]), self.page_size)
        products = list(self.products.values())
        data = products[(page - 1) * size : page * size]
        last_page = max(1, math.ceil(len(products) / size))
        return 200, {"current_page": page, "last_page": last_page, "data": data}

    def _create(self, body: Any) -> tuple[int, Any]:
        body = body or {}
        areas = body.get("print_areas") or []
        image_ids = [
            image.get("id")
            for area in areas
            for placeholder in area.get("placeholders", [])
            for image in placeholder.get("images", [])
        ]
        variants = body.get("variants") or []
        if (
            not body.get("title")
            or not isinstance(body.get("blueprint_id"), int)
            or not isinstance(body.get("print_provider_id"), int)
            or not variants
            or not all(isinstance(v.get("price"), int) for v in variants)
            or not image_ids
            or any(i not in self.uploads for i in image_ids)
        ):
            return 400, {"errors": "title, blueprint, provider, variants and images needed"}
        product = {
            **{k: body[k] for k in ("title", "description", "tags", "blueprint_id")},
            **{k: body[k] for k in ("print_provider_id", "variants", "print_areas")},
            "id": uuid.uuid4().hex[:24],
            "is_locked": False,
        }
        self.products[product["id"]] = product
        if self.hang_up_after_create:
            self.hang_up_after_create -= 1
            raise HangUp
        return 200, product

    def _publish(self, product_id: str) -> tuple[int, Any]:
        if product_id not in self.products:
            return 404, {"errors": "Product not found"}
        if self.fail_publish:
            self.fail_publish -= 1
            return 500, {"errors": "publishing is down"}
        self.products[product_id]["is_locked"] = True
        self.published.append(product_id)
        return 200, {}


class FakeShopify(FakePlatform):
    """Shopify's Admin REST products endpoint: list by handle, create. Like Shopify, a
    product created with a handle already taken gets `<handle>-1`."""

    def __init__(self, *, api_version: str = "2024-10") -> None:
        super().__init__()
        self.api_version = api_version
        self.products: list[dict[str, Any]] = []
        self.images: dict[int, bytes] = {}  # product id -> its first image, decoded

    def authorized(self, headers: Any) -> bool:
        return headers.get("X-Shopify-Access-Token") == SHOPIFY_TOKEN

    def handle_api(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        if path != f"/admin/api/{self.api_version}/products.json":
            return 404, {"errors": "Not Found"}
        if method == "GET":
            handles = set(",".join(query.get("handle", [])).split(",")) - {""}
            found = [p for p in self.products if not handles or p["handle"] in handles]
            return 200, {"products": found}
        return self._create((body or {}).get("product") or {})

    def _create(self, product: dict[str, Any]) -> tuple[int, Any]:
        if not product.get("title"):
            return 422, {"errors": {"title": ["can't be blank"]}}
        handle = product.get("handle") or product["title"].lower().replace(" ", "-")
        if any(p["handle"] == handle for p in self.products):
            handle = f"{handle}-1"
        made = {
            **{k: v for k, v in product.items() if k != "images"},
            "id": 1000 + len(self.products),
            "handle": handle,
            "images": [],
        }
        for image in product.get("images") or []:
            decoded = _decoded(image.get("attachment"))
            if decoded is None:
                return 422, {"errors": {"images": ["attachment is not base64"]}}
            self.images.setdefault(made["id"], decoded)
            made["images"].append({"id": len(made["images"]) + 1, "alt": image.get("filename")})
        self.products.append(made)
        if self.hang_up_after_create:
            self.hang_up_after_create -= 1
            raise HangUp
        return 201, {"product": made}


@pytest.fixture
def printify() -> Iterator[FakePrintify]:
    server = FakePrintify()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def shopify() -> Iterator[FakeShopify]:
    server = FakeShopify()
    server.start()
    yield server
    server.stop()


# --- S3: moto in server mode ------------------------------------------------------------


@dataclass
class S3Bucket:
    """A bucket on the local moto server, with a client to look into it."""

    endpoint: str
    name: str
    client: Any = field(repr=False)

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.name)
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def content_type(self, key: str) -> str:
        return self.client.head_object(Bucket=self.name, Key=key)["ContentType"]


def moto_call(endpoint: str, path: str, body: bytes = b"") -> None:
    """POST to moto's own API (`/moto-api/reset`, `/moto-api/reset-auth`)."""
    # Not form-encoded: moto reads the raw body, which Flask leaves empty for forms.
    request = urllib.request.Request(
        f"{endpoint}{path}", data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> Iterator[S3Bucket]:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )
    bucket = S3Bucket(moto_endpoint, f"omniva-test-{uuid.uuid4().hex[:12]}", client)
    client.create_bucket(Bucket=bucket.name)
    yield bucket
    client.close()
    # moto keeps its buckets in this process for as long as it lives.
    moto_call(moto_endpoint, "/moto-api/reset")
