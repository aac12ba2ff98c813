"""SSRF, field by field: every URL a user gives is refused, through the path the user
takes, when it leads to the server's own network.

The URL fields, found in the serializers, the pipelines' params schemas and the callers
of omniva.outbound; each is given through /v1 and used by what needs it, and the
refusal is shown where the user looks:
- webhook `config.url` (POST /v1/destinations; the publish job's adapter POSTs to it),
  printify and shopify `config.api_base`, shopify `config.shop` (a host, https) and
  s3 `config.endpoint_url` (checked, then handed to boto3): the publication fails
  with UPLOAD_FAILED and the outbound code as its `error.reason`, the job fails
  UPLOAD_FAILED;
- image_upscale `input_url` (fetched by the `fetch` stage) and `output_url` (checked
  by `fetch` before any work, PUT by `store`), api_call `url`, clipfarm `source_url`,
  a report image's `data` (POST /v1/jobs): the job's `error.code`;
- the media URLs in a feed at a clipfarm `source_url`: the job's `result.rejected`.

A creator's `source_url` (POST /v1/creators) takes the clipfarm `source_url` path; it
and the report image URL's loopback spellings are also in test_hostile_input.py.

Not user URLs, so not guarded (and not here):
- the ComfyUI URL (OMNIVA_COMFYUI_URL, `run_engine --comfyui-url`): the operator's
  engine configuration, usually a private address on purpose (ComfyUI listens on
  127.0.0.1:8188). An event's data cannot name it: the request takes `prompt`,
  `negative_prompt`, `seed`, `width` and `height` only (engines/sdk/image_generation.py).
- the engine's server URL (`run_engine --server`) and the media bucket's endpoint
  (OMNIVA_S3_ENDPOINT_URL): operator settings.
- a clip's `media_url` and a publication's `url`: never fetched by the server; a remote
  `media_url` travels to the platform as data.

Each field meets every target: loopback (127.0.0.1, ::1, localhost, ::ffff:127.0.0.1),
the private ranges (10/8, 172.16/12, 192.168/16), link-local (169.254.169.254, the cloud
metadata service), IPv4-mapped IPv6 (::ffff:10.1.2.3), names resolving to a private
address (alone, before a public one, or IPv4-mapped) and a redirect from an allowed
public server to the metadata address. Each must be refused with URL_NOT_ALLOWED where
the user sees it, with no connection reaching the internal server, and nothing
half-written: no publication sent, no clip made, no result, no file in the job's
folder, and the job failed at once, without retries (a feed's job goes on without the
refused entry). Platform APIs and boto3 follow no redirect at all, so there the
redirect is the failed answer (FETCH_FAILED; "S3 answered 307"). An `output_url` that
redirects is only refused when `store` sends, after the upscale: the job fails with
URL_NOT_ALLOWED and no result, its picture left in the job's folder.

The network is made here: `socket.getaddrinfo` answers for the fake names (a DNS the
test controls) and `socket.socket.connect` sends the fake addresses to two counting
servers on 127.0.0.1 (a NAT): the public one as 1.2.3.4 (`cdn.example`), every private
address to the internal one. Both are the standard library's boundary, not our code,
so the guard under test runs unchanged. The control tests turn
OMNIVA_ALLOW_PRIVATE_URLS on and show that the same paths, and every target, do reach
the internal server: a field or a spelling whose guard were gone would be seen.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from jobs.services import job_files
from omniva.media import artifact_save, media_reference
from omniva.models import Clip
from tests.jobs.conftest import drain, stop_job_listener  # noqa: F401 (fixtures)
from tests.omniva.test_outbound import Route, redirect, reply

pytestmark = pytest.mark.django_db

PUBLIC_ADDRESS = "1.2.3.4"
METADATA_URL = "http://169.254.169.254/latest/meta-data/"
# The fake DNS: names the test resolves itself; every other name goes to the system's.
FAKE_DNS = {
    "cdn.example": [PUBLIC_ADDRESS],
    "intranet.example": ["10.20.30.40"],
    "mixed.example": ["10.20.30.40", PUBLIC_ADDRESS],
    "mapped.example": ["::ffff:10.20.30.40"],
}
# The private addresses of the targets, which the NAT sends to the internal server
# (any port; loopback too on ports 80 and 443, where the targets name no port).
INTERNAL_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("10.1.2.3", "172.16.5.4", "192.168.7.8", "169.254.169.254", "10.20.30.40", "::1")
)


def png(width: int = 32, height: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


# --- the network ---------------------------------------------------------------------------


class CountingServer(ThreadingHTTPServer):
    """Counts every connection (TLS attempts included) and request; answers by route,
    else 200 with a JSON object."""

    daemon_threads = True

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[str] = []
        self.routes: dict[str, Route] = {}
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.connections += 1  # in the serving thread, before a handler thread starts
        return True


class _Handler(BaseHTTPRequestHandler):
    server: CountingServer
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.requests.append(f"{self.command} {self.path}")
        # A route answers its path and every path under it (an API base's calls).
        path = self.path.split("?", 1)[0]
        route = next((r for p, r in self.server.routes.items() if path.startswith(p)), None)
        if route is None:
            route = reply(b'{"id": "reached", "data": []}', content_type="application/json")
        route(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Network:
    public: CountingServer  # cdn.example, 1.2.3.4
    internal: CountingServer  # every private address of the targets


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[Network]:
    servers = Network(public=CountingServer(), internal=CountingServer())
    threads = [
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for server in (servers.public, servers.internal)
    ]
    for thread in threads:
        thread.start()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple]:
        name = host.decode() if isinstance(host, bytes) else host
        addresses = FAKE_DNS.get(str(name).lower().rstrip(".")) if name else None
        if addresses is None:
            return real_getaddrinfo(host, port, *args, **kwargs)
        number = int(port or 0)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, number, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, number))
            for a in addresses
        ]

    def connect(sock: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and sock.family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            to = (
                servers.public
                if str(ip) == PUBLIC_ADDRESS
                else servers.internal
                if ip in INTERNAL_ADDRESSES or (ip.is_loopback and address[1] in (80, 443))
                else None
            )
            if to is not None and sock.family == socket.AF_INET:
                address = ("127.0.0.1", to.port)
            elif to is not None:
                address = ("::ffff:127.0.0.1", to.port, 0, 0)
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    servers.public.routes["/to-metadata"] = redirect(METADATA_URL, status=307)
    try:
        yield servers
    finally:
        for server in (servers.public, servers.internal):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join()


# --- targets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    netloc: str  # {port}: the internal server's
    host: str | None = None  # as a bare host (shopify's `shop`), where it can be one
    redirect: bool = False

    def url(self, network: Network, path: str = "/x") -> str:
        if self.redirect:
            return f"http://cdn.example:{network.public.port}/to-metadata"
        return f"http://{self.netloc.format(port=network.internal.port)}{path}"


TARGETS = (
    Target("loopback", "127.0.0.1:{port}", "127.0.0.1"),
    Target("loopback-ipv6", "[::1]:{port}"),
    Target("localhost", "localhost:{port}"),
    Target("ipv4-mapped-loopback", "[::ffff:127.0.0.1]:{port}"),
    Target("private-10", "10.1.2.3:{port}", "10.1.2.3"),
    Target("private-172.16", "172.16.5.4:{port}", "172.16.5.4"),
    Target("private-192.168", "192.168.7.8:{port}", "192.168.7.8"),
    Target("link-local-metadata", "169.254.169.254", "169.254.169.254"),
    Target("ipv4-mapped-private", "[::ffff:10.1.2.3]:{port}"),
    Target("name-to-private", "intranet.example:{port}", "intranet.example"),
    Target("name-to-public-and-private", "mixed.example:{port}", "mixed.example"),
    Target("name-to-ipv4-mapped", "mapped.example:{port}", "mapped.example"),
    Target("redirect-to-metadata", "", redirect=True),
)


# --- what the user does, field by field ----------------------------------------------------


@dataclass
class Outcome:
    code: str | None  # the stable code where the user sees the refusal
    half_written: list[str] = field(default_factory=list)


@dataclass
class User:
    """Acts through /v1 with an admin key and runs the queues in-process."""

    api: Any
    drain: Callable[..., Any]
    media: Path
    made: int = 0  # numbers the names of what it makes
    # The project and clip every destination of a test publishes.
    clip: dict[str, Any] | None = None

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.api.post(path, body, content_type="application/json")
        assert response.status_code in (201, 202), response.json()
        return response.json()["data"]

    def get(self, path: str) -> Any:
        response = self.api.get(path)
        assert response.status_code == 200, response.json()
        return response.json()["data"]

    def run_job(
        self,
        pipeline: str,
        params: dict[str, Any],
        project: str | None = None,
        queues: tuple[str, ...] = ("default", "gpu"),
    ) -> dict:
        body: dict[str, Any] = {"pipeline": pipeline, "params": params}
        if project is not None:
            body["project"] = project
        job = self.post("/v1/jobs", body)
        while sum(len(self.drain(queue)) for queue in queues):
            pass
        return self.get(f"/v1/jobs/{job['id']}")

    def name(self, prefix: str) -> str:
        self.made += 1
        return f"{prefix}-{self.made}"

    def project(self) -> str:
        return self.post("/v1/projects", {"name": self.name("ssrf")})["id"]


def failed_at_once(job: dict[str, Any]) -> list[str]:
    wrong = []
    if job["status"] != "failed":
        wrong.append(f"job {job['status']}")
    if job["attempts"] != 1:
        wrong.append(f"job attempts {job['attempts']}")
    if job["result"] is not None:
        wrong.append("job result")
    return wrong


def job_files_left(job: dict[str, Any]) -> list[str]:
    folder = job_files(job["id"])
    return [f"job file {p.name}" for p in folder.rglob("*") if p.is_file()]


def publish_to(user: User, kind: str, config: dict[str, Any], secrets: dict[str, str]) -> Outcome:
    if user.clip is None:
        project = user.project()
        name = artifact_save(f"clips/{project}/design.png", png())
        user.clip = user.post(
            "/v1/clips", {"project": project, "title": "Sunset", "media_url": media_reference(name)}
        )
    clip = user.clip
    destination = user.post(  # one of its own for each target
        "/v1/destinations",
        {
            "project": clip["project"],
            "name": user.name(kind),
            "kind": kind,
            "config": config,
            "secrets": secrets,
        },
    )
    # Only the default queue: the clip's embedding (gpu) is not what is published.
    job = user.run_job(
        "publish",
        {"clip_id": clip["id"], "destinations": [destination["id"]]},
        clip["project"],
        queues=("default",),
    )
    [publication] = user.get(f"/v1/publications?destination={destination['id']}")
    wrong = failed_at_once(job)
    if job["error"] is None or job["error"]["code"] != "UPLOAD_FAILED":
        wrong.append(f"job error {job['error']}")
    if publication["status"] != "failed" or publication["external_id"]:
        wrong.append(f"publication {publication['status']} {publication['external_id']!r}")
    if publication["published_at"] is not None:
        wrong.append("publication published_at")
    error = publication["error"] or {}
    if error.get("code") != "UPLOAD_FAILED" or error.get("transient") is not False:
        wrong.append(f"publication error {error}")
    return Outcome(error.get("reason"), wrong)


PRINTIFY_CONFIG = {
    "shop_id": 1, "blueprint_id": 6, "print_provider_id": 99, "variants": [12100], "price": 2499,
}  # fmt: skip
S3_SECRETS = {"access_key_id": "AKIAEXAMPLE000000", "secret_access_key": "s3-secret-example"}


def webhook_url(user: User, url: str) -> Outcome:
    return publish_to(user, "webhook", {"url": url}, {"secret": "whsec-example"})


def printify_api_base(user: User, url: str) -> Outcome:
    return publish_to(
        user, "printify", {**PRINTIFY_CONFIG, "api_base": url}, {"api_token": "printify-token"}
    )


def shopify_api_base(user: User, url: str) -> Outcome:
    return publish_to(user, "shopify", {"api_base": url}, {"access_token": "shpat-example"})


def shopify_shop(user: User, host: str) -> Outcome:
    return publish_to(user, "shopify", {"shop": host}, {"access_token": "shpat-example"})


def s3_endpoint_url(user: User, url: str) -> Outcome:
    config = {"bucket": "bucket", "region": "us-east-1", "endpoint_url": url.removesuffix("/x")}
    return publish_to(user, "s3", config, S3_SECRETS)


def job_outcome(job: dict[str, Any]) -> Outcome:
    return Outcome((job["error"] or {}).get("code"), failed_at_once(job) + job_files_left(job))


def upscale_input_url(user: User, url: str) -> Outcome:
    return job_outcome(user.run_job("image_upscale", {"input_url": url}))


def upscale_output_url(user: User, url: str) -> Outcome:
    (user.media / "in").mkdir(parents=True, exist_ok=True)
    (user.media / "in" / "pic.png").write_bytes(png())
    job = user.run_job("image_upscale", {"input_url": "in/pic.png", "output_url": url})
    if url.endswith("/to-metadata"):
        # Refused at the redirect, after the upscale: the picture is in the job's own
        # folder (removed with the job), delivered nowhere.
        return Outcome((job["error"] or {}).get("code"), failed_at_once(job))
    return job_outcome(job)


def api_call_url(user: User, url: str) -> Outcome:
    return job_outcome(user.run_job("api_call", {"url": url}))


def clipfarm_source_url(user: User, url: str) -> Outcome:
    project = user.project()
    outcome = job_outcome(user.run_job("clipfarm", {"source_url": url}, project))
    if Clip.objects.filter(project=project).exists():
        outcome.half_written.append("clip")
    return outcome


def feed_media_url(user: User, url: str, network: Network) -> Outcome:
    feed = (
        '<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>'
        f'<item><title>clip</title><enclosure url="{url}" type="video/mp4" length="1"/>'
        "</item></channel></rss>"
    ).encode()
    network.public.routes["/feed.xml"] = reply(feed, content_type="application/rss+xml")
    project = user.project()
    job = user.run_job(
        "clipfarm", {"source_url": f"http://cdn.example:{network.public.port}/feed.xml"}, project
    )
    wrong = [] if job["status"] in ("completed", "failed") else [f"job {job['status']}"]
    if Clip.objects.filter(project=project).exists():
        wrong.append("clip")
    rejected = ((job["result"] or {}).get("rejected")) or [{}]
    return Outcome(rejected[0].get("code"), wrong)


def report_image(user: User, url: str) -> Outcome:
    params = {"inputs": [{"input_id": "picture", "type": "image", "data": url}]}
    return job_outcome(user.run_job("report", params))


@dataclass(frozen=True)
class Field:
    name: str
    attempt: Callable[..., Outcome]
    redirect_code: str | None = "URL_NOT_ALLOWED"
    takes_host: bool = False  # given a bare host, not a URL
    needs_network: bool = False

    def targets(self) -> list[Target]:
        return [t for t in TARGETS if t.host is not None] if self.takes_host else list(TARGETS)

    def run(self, user: User, network: Network, target: Target) -> Outcome:
        given = target.host if self.takes_host else target.url(network)
        if self.needs_network:
            return self.attempt(user, given, network)
        return self.attempt(user, given)


FIELDS = (
    # A webhook is a POST: it follows 307, and the hop is checked like the first URL.
    Field("webhook url", webhook_url),
    # Platform APIs follow no redirect at all (their tokens travel in headers).
    Field("printify api_base", printify_api_base, redirect_code="FETCH_FAILED"),
    Field("shopify api_base", shopify_api_base, redirect_code="FETCH_FAILED"),
    Field("shopify shop", shopify_shop, takes_host=True),
    # botocore follows no redirect either (nor asks the store for a region): the
    # store's 307 is its answer, "S3 answered 307", with no code of outbound's.
    Field("s3 endpoint_url", s3_endpoint_url, redirect_code=None),
    Field("image_upscale input_url", upscale_input_url),
    Field("image_upscale output_url", upscale_output_url),
    Field("api_call url", api_call_url),
    Field("clipfarm source_url", clipfarm_source_url),
    Field("feed media url", feed_media_url, needs_network=True),
    Field("report image url", report_image),
)


@pytest.fixture
def user(api: Any, drain: Callable[..., Any], settings: Any, tmp_path: Path) -> User:  # noqa: F811
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.OMNIVA_PUBLISH_ROOT = tmp_path / "publish"
    settings.OMNIVA_ALLOW_PRIVATE_URLS = False
    settings.OMNIVA_FETCH_TIMEOUT_S = 5
    return User(api=api, drain=drain, media=Path(settings.MEDIA_ROOT))


@pytest.mark.parametrize("given", FIELDS, ids=[f.name for f in FIELDS])
def test_every_private_target_in_a_url_field_is_refused_with_its_code_and_nothing_written(
    user: User, network: Network, fault_report: Callable[..., None], given: Field
) -> None:
    wrong: list[str] = []
    coded = written = 0
    for target in given.targets():
        before = network.internal.connections
        outcome = given.run(user, network, target)
        expected = given.redirect_code if target.redirect else "URL_NOT_ALLOWED"
        problems = [f"code {outcome.code}, not {expected}"] if outcome.code != expected else []
        if network.internal.connections > before:
            problems.append(f"internal server reached {network.internal.connections - before}x")
        problems += outcome.half_written
        coded += outcome.code == expected
        written += bool(outcome.half_written)
        if problems:
            wrong.append(f"{target.name}: {', '.join(problems)}")
    fault_report(
        targets=len(given.targets()),
        refused_as_expected=coded,
        internal_connections=network.internal.connections,
        half_written=written,
    )
    assert wrong == [], wrong
    assert network.internal.requests == []


def reached(user: User, network: Network, given: Field, targets: list[Target]) -> list[str]:
    """The targets through which `given` reached the internal server."""
    names = []
    for target in targets:
        before = network.internal.connections
        given.run(user, network, target)
        if network.internal.connections > before:
            names.append(target.name)
    return names


# The controls: what the refusals above keep out is really reachable, so a field or a
# spelling whose guard were gone would be seen. OMNIVA_ALLOW_PRIVATE_URLS turns the
# guard off; everything else stays as above.


def test_with_private_urls_allowed_every_target_reaches_the_internal_server(
    user: User, network: Network, settings: Any
) -> None:
    settings.OMNIVA_ALLOW_PRIVATE_URLS = True
    webhook = next(f for f in FIELDS if f.name == "webhook url")
    names = reached(user, network, webhook, list(TARGETS))
    print(f"{len(names)} of {len(TARGETS)} targets reached the internal server")
    assert names == [t.name for t in TARGETS]


@pytest.mark.parametrize("given", FIELDS, ids=[f.name for f in FIELDS])
def test_with_private_urls_allowed_each_field_reaches_the_internal_server(
    user: User, network: Network, settings: Any, given: Field
) -> None:
    settings.OMNIVA_ALLOW_PRIVATE_URLS = True
    target = next(t for t in TARGETS if t.name == "name-to-private")
    assert reached(user, network, given, [target]) == [target.name]
