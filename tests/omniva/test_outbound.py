"""Outbound HTTP to user-given URLs: SSRF refusals, redirects, size and time limits.

Every test talks to real HTTP servers started here on loopback addresses (127.0.0.1 and
127.0.0.2, both answered by Linux's loopback), so what is refused is shown to be
refused before a request leaves, by the servers' own request counts.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from omniva import outbound
from omniva.outbound import (
    Fetched,
    OutboundError,
    address_allowed,
    allowed_networks_from_settings,
    fetch,
    media_path,
    request,
    send,
)

Route = Callable[[BaseHTTPRequestHandler], None]

ONLY_127_0_0_1 = [ip_network("127.0.0.1/32")]
LOOPBACK = [ip_network("127.0.0.0/8")]


@dataclass
class Seen:
    method: str
    path: str
    headers: http.client.HTTPMessage  # every header line as sent, in order
    body: bytes


@dataclass
class LocalServer:
    host: str
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    # Set at teardown: handlers that stall or drip wait on it instead of sleeping.
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str = "/", *, scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"


def _handler_for(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            server.requests.append(Seen(self.command, self.path, self.headers, body))
            route = server.routes.get(self.path.split("?", 1)[0], reply(b"nothing here", 404))
            # The client hangs up mid-answer where the size and time limits make it.
            with contextlib.suppress(OSError):
                route(self)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

    return Handler


class _TLSServer(ThreadingHTTPServer):
    context: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True), address


@contextmanager
def serving(host: str, context: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    server = LocalServer(host=host, port=0)
    server_class = ThreadingHTTPServer if context is None else _TLSServer
    httpd = server_class((host, 0), _handler_for(server))
    if context is not None:
        context.sni_callback = lambda _sock, name, _ctx: server.server_names.append(name)
        httpd.context = context  # type: ignore[attr-defined]
    server.port = httpd.server_address[1]
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with serving("127.0.0.1") as local:
        yield local


@pytest.fixture
def other_server() -> Iterator[LocalServer]:
    with serving("127.0.0.2") as local:
        yield local


def reply(
    body: bytes = b"",
    status: int = 200,
    content_type: str = "text/plain",
    headers: dict[str, str] | None = None,
) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    return route


def redirect(location: str, status: int = 302) -> Route:
    return reply(status=status, headers={"Location": location})


def streamed(total: int, *, chunked: bool) -> Route:
    """A body without Content-Length: chunked, or delimited by closing the connection."""

    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/octet-stream")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        sent = 0
        while sent < total:
            piece = b"x" * min(4096, total - sent)
            if chunked:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                handler.wfile.write(piece)
            sent += len(piece)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")

    return route


def refused(call: Callable[[], object], code: str) -> OutboundError:
    with pytest.raises(OutboundError) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


# --- fetching ----------------------------------------------------------------------


def test_fetch_from_an_allowed_network_returns_body_content_type_and_status(
    server: LocalServer,
) -> None:
    server.routes["/image.png"] = reply(b"\x89PNG...", content_type="image/png")

    result = fetch(server.url("/image.png?size=2"), allowed_networks=ONLY_127_0_0_1)

    assert isinstance(result, Fetched)
    assert (result.body, result.content_type, result.final_url, result.status) == (
        b"\x89PNG...",
        "image/png",
        server.url("/image.png?size=2"),
        200,
    )
    [seen] = server.requests
    assert seen.path == "/image.png?size=2"
    assert seen.headers["Host"] == f"127.0.0.1:{server.port}"


def test_loopback_is_refused_without_an_allowance_before_any_request(
    server: LocalServer,
) -> None:
    server.routes["/"] = reply(b"secret")

    error = refused(lambda: fetch(server.url(), allowed_networks=[]), "URL_NOT_ALLOWED")

    assert error.transient is False
    assert server.requests == []


def test_the_default_allowance_is_read_from_settings_at_call_time(
    server: LocalServer, settings
) -> None:
    server.routes["/"] = reply(b"ok")

    settings.OMNIVA_ALLOW_PRIVATE_URLS = False
    refused(lambda: fetch(server.url()), "URL_NOT_ALLOWED")
    settings.OMNIVA_ALLOW_PRIVATE_URLS = True
    assert fetch(server.url()).body == b"ok"

    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://localhost/", "URL_NOT_ALLOWED"),
        ("http://[::ffff:10.0.0.1]/", "URL_NOT_ALLOWED"),
        ("ftp://example.com/", "URL_NOT_ALLOWED"),
    ],
)
def test_check_refuses_a_url_as_a_request_would(url: str, code: str) -> None:
    refused(lambda: outbound.check(url, allowed_networks=[]), code)


def test_check_passes_an_allowed_url_and_refuses_it_unallowed_without_connecting(
    server: LocalServer,
) -> None:
    outbound.check(server.url("/upload"), allowed_networks=LOOPBACK)
    refused(lambda: outbound.check(server.url("/upload"), allowed_networks=[]), "URL_NOT_ALLOWED")

    assert server.requests == []


def test_the_default_size_limit_is_read_from_settings(server: LocalServer, settings) -> None:
    server.routes["/"] = reply(b"x" * 20)
    settings.OMNIVA_FETCH_MAX_BYTES = 10

    refused(lambda: fetch(server.url(), allowed_networks=LOOPBACK), "FETCH_TOO_LARGE")


def test_a_name_resolving_to_loopback_is_refused(server: LocalServer) -> None:
    refused(lambda: fetch(server.url(host="localhost"), allowed_networks=[]), "URL_NOT_ALLOWED")

    assert server.requests == []


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0x7f000001",
        "127.1",
        "0x7f.1",
        "017700000001",
        "0177.0.0.1",
        "127.0.0.1.",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
    ],
)
def test_numeric_and_bracketed_hosts_are_checked_as_the_address_they_spell(
    server: LocalServer, host: str
) -> None:
    refused(lambda: fetch(server.url(host=host), allowed_networks=[]), "URL_NOT_ALLOWED")

    assert server.requests == []


@pytest.mark.parametrize("host", ["2130706433", "0x7f000001", "127.1", "0x7f.1"])
def test_numeric_hosts_reach_the_address_they_spell_when_it_is_allowed(
    server: LocalServer, host: str
) -> None:
    server.routes["/"] = reply(b"found")

    assert fetch(server.url(host=host), allowed_networks=ONLY_127_0_0_1).body == b"found"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/file",
        "gopher://example.com:70/_x",
        "javascript:alert(1)",
        "//example.com/no-scheme",
        "http:///no-host",
        "http://user:password@example.com/",
        "http://user@example.com/",
        "https://:@example.com/",
        "http://example.com\\@127.0.0.1/",
        "http://exa mple.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://127.0.0.1:0/",
        "http://127.0.0.1:99999/",
        "http://%31%32%37.0.0.1/",
        "http://1.2.3.4.5/",
        "",
    ],
)
def test_urls_other_than_plain_http_and_https_are_refused(url: str) -> None:
    error = refused(lambda: fetch(url, allowed_networks=LOOPBACK), "URL_NOT_ALLOWED")

    assert error.transient is False


# --- redirects ---------------------------------------------------------------------


def test_a_redirect_to_an_address_not_allowed_is_refused_before_reaching_it(
    server: LocalServer, other_server: LocalServer
) -> None:
    server.routes["/"] = redirect(other_server.url("/internal"))
    other_server.routes["/internal"] = reply(b"secret")

    refused(lambda: fetch(server.url(), allowed_networks=ONLY_127_0_0_1), "URL_NOT_ALLOWED")

    assert len(server.requests) == 1
    assert other_server.requests == []


def test_a_redirect_to_a_file_url_is_refused(server: LocalServer) -> None:
    server.routes["/"] = redirect("file:///etc/passwd")

    refused(lambda: fetch(server.url(), allowed_networks=LOOPBACK), "URL_NOT_ALLOWED")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_followed_when_every_hop_is_allowed(
    server: LocalServer, other_server: LocalServer, status: int
) -> None:
    server.routes["/start"] = redirect("/next?x=1", status)  # relative to the current URL
    server.routes["/next"] = redirect(other_server.url("/final"), status)
    other_server.routes["/final"] = reply(b"arrived", content_type="text/plain")

    result = fetch(server.url("/start"), allowed_networks=LOOPBACK)

    assert result.body == b"arrived"
    assert result.final_url == other_server.url("/final")
    assert [seen.path for seen in server.requests] == ["/start", "/next?x=1"]
    assert other_server.requests[0].headers["Host"] == f"127.0.0.2:{other_server.port}"


def test_too_many_redirects_fail_permanently(server: LocalServer) -> None:
    server.routes["/loop"] = redirect("/loop")

    error = refused(
        lambda: fetch(server.url("/loop"), allowed_networks=LOOPBACK, max_redirects=3),
        "FETCH_FAILED",
    )

    assert error.transient is False
    assert len(server.requests) == 4  # the first request and three redirects


def test_credentials_are_not_forwarded_to_another_origin(
    server: LocalServer, other_server: LocalServer
) -> None:
    server.routes["/"] = redirect(other_server.url("/elsewhere"))
    other_server.routes["/elsewhere"] = reply(b"ok")

    fetch(
        server.url(),
        allowed_networks=LOOPBACK,
        headers={"Authorization": "Bearer secret", "X-Trace": "abc"},
    )

    assert server.requests[0].headers["Authorization"] == "Bearer secret"
    assert "Authorization" not in other_server.requests[0].headers
    assert other_server.requests[0].headers["X-Trace"] == "abc"


# --- size and time limits ----------------------------------------------------------


def test_a_body_over_max_bytes_with_content_length_is_refused(server: LocalServer) -> None:
    server.routes["/big"] = reply(b"x" * 5000)

    error = refused(
        lambda: fetch(server.url("/big"), allowed_networks=LOOPBACK, max_bytes=1000),
        "FETCH_TOO_LARGE",
    )

    assert error.transient is False


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "until-close"])
def test_a_streamed_body_over_max_bytes_is_refused_without_reading_it_all(
    server: LocalServer, chunked: bool
) -> None:
    # 64 MiB would take a while to read; stopping at the limit returns at once.
    server.routes["/stream"] = streamed(64 * 1024 * 1024, chunked=chunked)

    started = time.monotonic()
    refused(
        lambda: fetch(server.url("/stream"), allowed_networks=LOOPBACK, max_bytes=10_000),
        "FETCH_TOO_LARGE",
    )

    assert time.monotonic() - started < 2


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "until-close"])
def test_a_streamed_body_of_exactly_max_bytes_is_accepted(
    server: LocalServer, chunked: bool
) -> None:
    server.routes["/stream"] = streamed(10_000, chunked=chunked)

    result = fetch(server.url("/stream"), allowed_networks=LOOPBACK, max_bytes=10_000)

    assert result.body == b"x" * 10_000


def test_a_stalled_server_is_a_transient_failure_within_the_timeout(
    server: LocalServer,
) -> None:
    server.routes["/stall"] = lambda handler: server.release.wait()

    started = time.monotonic()
    error = refused(
        lambda: fetch(server.url("/stall"), allowed_networks=LOOPBACK, timeout_s=0.5),
        "FETCH_UNAVAILABLE",
    )

    assert error.transient is True
    assert 0.4 < time.monotonic() - started < 1.5


def test_a_server_dripping_bytes_cannot_outlast_the_deadline(server: LocalServer) -> None:
    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        # Each byte arrives well within any per-read timeout; only a deadline over the
        # whole fetch stops this.
        while not server.release.wait(0.05):
            handler.wfile.write(b"x")

    server.routes["/drip"] = drip

    started = time.monotonic()
    refused(
        lambda: fetch(server.url("/drip"), allowed_networks=LOOPBACK, timeout_s=0.5),
        "FETCH_UNAVAILABLE",
    )

    assert time.monotonic() - started < 1.5


def test_a_connection_cut_mid_body_is_transient(server: LocalServer) -> None:
    def cut(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b"only part")
        handler.close_connection = True

    server.routes["/cut"] = cut

    error = refused(
        lambda: fetch(server.url("/cut"), allowed_networks=LOOPBACK), "FETCH_UNAVAILABLE"
    )

    assert error.transient is True


# --- HTTP and connection errors ----------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_and_rate_limits_are_transient(server: LocalServer, status: int) -> None:
    server.routes["/"] = reply(b"busy", status)

    error = refused(lambda: fetch(server.url(), allowed_networks=LOOPBACK), "FETCH_UNAVAILABLE")

    assert error.transient is True
    assert error.status == status


@pytest.mark.parametrize("status", [404, 403, 400])
def test_client_errors_fail_permanently(server: LocalServer, status: int) -> None:
    server.routes["/"] = reply(b"no", status)

    error = refused(lambda: fetch(server.url(), allowed_networks=LOOPBACK), "FETCH_FAILED")

    assert error.transient is False
    assert error.status == status


def test_a_closed_port_fails_permanently() -> None:
    # Bound but not listening: connecting is refused, and nothing else can take the port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

        error = refused(
            lambda: fetch(f"http://127.0.0.1:{port}/", allowed_networks=LOOPBACK),
            "FETCH_FAILED",
        )

    assert error.transient is False


def test_a_name_that_does_not_resolve_fails_permanently(monkeypatch) -> None:
    def no_such_name(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)

    error = refused(lambda: fetch("http://no-such-host.invalid/"), "FETCH_FAILED")

    assert error.transient is False


# --- DNS: every address checked, the checked one used ------------------------------


def _resolving(mapping: Callable[[int], list[str]]) -> Callable[..., list]:
    """A getaddrinfo whose answer for any name depends on how often it was asked."""
    real = socket.getaddrinfo
    calls = {"n": 0}

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host.endswith(".test"):
            calls["n"] += 1
            answers = mapping(calls["n"])
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answers
            ]
        return real(host, port, *args, **kwargs)

    getaddrinfo.calls = calls  # type: ignore[attr-defined]
    return getaddrinfo


def test_the_checked_address_is_connected_to_not_the_name_resolved_again(
    server: LocalServer, monkeypatch
) -> None:
    # Rebinding: the first answer passes the check, a later one would point elsewhere.
    resolver = _resolving(lambda n: ["127.0.0.1"] if n == 1 else ["169.254.169.254"])
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    server.routes["/"] = reply(b"pinned")

    result = fetch(server.url(host="rebind.test"), allowed_networks=ONLY_127_0_0_1)

    assert result.body == b"pinned"
    assert resolver.calls["n"] == 1  # type: ignore[attr-defined]
    assert server.requests[0].headers["Host"] == f"rebind.test:{server.port}"


def test_a_name_with_any_address_not_allowed_is_refused(server: LocalServer, monkeypatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolving(lambda n: ["127.0.0.1", "10.0.0.7"]))

    refused(
        lambda: fetch(server.url(host="mixed.test"), allowed_networks=ONLY_127_0_0_1),
        "URL_NOT_ALLOWED",
    )

    assert server.requests == []


# --- HTTPS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=files.test"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=DNS:files.test"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[LocalServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with serving("127.0.0.1", context) as local:
        yield local


def test_https_connects_to_the_address_and_verifies_the_certificate_for_the_name(
    tls_server: LocalServer, certificate: tuple[Path, Path], monkeypatch
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolving(lambda n: ["127.0.0.1"]))
    tls_server.routes["/"] = reply(b"over tls")
    trust = ssl.create_default_context(cafile=str(certificate[0]))

    result = fetch(
        tls_server.url(scheme="https", host="files.test"),
        allowed_networks=ONLY_127_0_0_1,
        ssl_context=trust,
    )

    assert result.body == b"over tls"
    assert tls_server.server_names == ["files.test"]
    assert tls_server.requests[0].headers["Host"] == f"files.test:{tls_server.port}"


def test_https_with_a_certificate_for_another_name_fails_permanently(
    tls_server: LocalServer, certificate: tuple[Path, Path]
) -> None:
    trust = ssl.create_default_context(cafile=str(certificate[0]))

    error = refused(
        lambda: fetch(tls_server.url(scheme="https"), allowed_networks=LOOPBACK, ssl_context=trust),
        "FETCH_FAILED",
    )

    assert error.transient is False
    assert tls_server.requests == []


# --- send ----------------------------------------------------------------------------


def test_send_put_delivers_the_body_and_content_type(server: LocalServer) -> None:
    server.routes["/upload"] = reply(b"stored", 201)

    result = send(
        "PUT",
        server.url("/upload?sig=abc"),
        body=b"\x89PNG output",
        content_type="image/png",
        allowed_networks=ONLY_127_0_0_1,
    )

    assert result.status == 201
    assert result.body == b"stored"
    [seen] = server.requests
    assert (seen.method, seen.path, seen.body) == ("PUT", "/upload?sig=abc", b"\x89PNG output")
    assert seen.headers["Content-Type"] == "image/png"


def test_send_to_a_private_address_without_an_allowance_is_refused(
    server: LocalServer,
) -> None:
    refused(
        lambda: send(
            "PUT", server.url(), body=b"x", content_type="text/plain", allowed_networks=[]
        ),
        "URL_NOT_ALLOWED",
    )

    assert server.requests == []


def test_send_follows_307_with_the_same_method_and_body(
    server: LocalServer, other_server: LocalServer
) -> None:
    server.routes["/upload"] = redirect(other_server.url("/bucket"), 307)
    other_server.routes["/bucket"] = reply(b"", 200)

    send(
        "POST",
        server.url("/upload"),
        body=b"data",
        content_type="text/plain",
        allowed_networks=LOOPBACK,
    )

    [seen] = other_server.requests
    assert (seen.method, seen.body) == ("POST", b"data")


def test_send_does_not_follow_a_redirect_that_would_drop_the_body(
    server: LocalServer, other_server: LocalServer
) -> None:
    server.routes["/upload"] = redirect(other_server.url("/bucket"), 303)

    refused(
        lambda: send(
            "PUT",
            server.url("/upload"),
            body=b"data",
            content_type="text/plain",
            allowed_networks=LOOPBACK,
        ),
        "FETCH_FAILED",
    )

    assert other_server.requests == []


def test_error_messages_leave_out_the_query_string(server: LocalServer) -> None:
    server.routes["/upload"] = reply(b"", 403)

    error = refused(
        lambda: send(
            "PUT",
            server.url("/upload?X-Signature=topsecret"),
            body=b"x",
            content_type="text/plain",
            allowed_networks=LOOPBACK,
        ),
        "FETCH_FAILED",
    )

    assert "topsecret" not in error.message
    assert "/upload" in error.message


# --- request: any method, any answer -------------------------------------------------


def test_fetch_exposes_the_answer_headers_with_lower_cased_names(server: LocalServer) -> None:
    server.routes["/"] = reply(b"ok", headers={"X-Request-Id": "r-1", "ETag": '"v2"'})

    result = fetch(server.url(), allowed_networks=LOOPBACK)

    assert result.headers["x-request-id"] == "r-1"
    assert result.headers["etag"] == '"v2"'
    assert result.headers["content-type"] == "text/plain"
    assert result.headers["content-length"] == "2"


def test_a_header_sent_more_than_once_comes_back_as_one_joined_value(
    server: LocalServer,
) -> None:
    def twice(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.send_header("Link", "</a>; rel=next")
        handler.send_header("link", "</z>; rel=last")
        handler.end_headers()

    server.routes["/"] = twice

    result = request("GET", server.url(), allowed_networks=LOOPBACK)

    assert result.headers["link"] == "</a>; rel=next, </z>; rel=last"


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (400, "FETCH_FAILED", False),
        (404, "FETCH_FAILED", False),
        (408, "FETCH_UNAVAILABLE", True),
        (429, "FETCH_UNAVAILABLE", True),
        (500, "FETCH_UNAVAILABLE", True),
        (503, "FETCH_UNAVAILABLE", True),
    ],
)
def test_without_raise_for_status_an_error_answer_comes_back_with_headers_and_body(
    server: LocalServer, status: int, code: str, transient: bool
) -> None:
    server.routes["/items/9"] = reply(
        b'{"error": "no such item"}',
        status,
        content_type="application/json",
        headers={"X-Request-Id": "r-9"},
    )

    answer = request(
        "GET", server.url("/items/9"), allowed_networks=LOOPBACK, raise_for_status=False
    )

    assert (answer.status, answer.body) == (status, b'{"error": "no such item"}')
    assert answer.content_type == "application/json"
    assert answer.headers["x-request-id"] == "r-9"
    assert answer.final_url == server.url("/items/9")
    # What the same answer would have raised by default.
    error = answer.status_error()
    assert error is not None
    assert (error.code, error.transient, error.status) == (code, transient, status)


def test_with_raise_for_status_an_error_answer_raises_as_fetch_does(server: LocalServer) -> None:
    server.routes["/"] = reply(b"gone", 404)

    error = refused(
        lambda: request("DELETE", server.url(), allowed_networks=LOOPBACK), "FETCH_FAILED"
    )

    assert error.status == 404


def test_a_2xx_answer_has_no_status_error(server: LocalServer) -> None:
    server.routes["/"] = reply(b"", 201)

    answer = request("POST", server.url(), allowed_networks=LOOPBACK, raise_for_status=False)

    assert answer.status == 201
    assert answer.status_error() is None


def test_head_returns_the_status_and_headers_without_reading_a_body(server: LocalServer) -> None:
    # The Content-Length is the size a GET would get; it is no body to refuse.
    server.routes["/video.mp4"] = reply(b"x" * 5000, content_type="video/mp4")

    answer = request("HEAD", server.url("/video.mp4"), allowed_networks=LOOPBACK, max_bytes=10)

    assert (answer.status, answer.body) == (200, b"")
    assert answer.headers["content-length"] == "5000"
    assert answer.content_type == "video/mp4"
    [seen] = server.requests
    assert seen.method == "HEAD"


def test_head_follows_a_redirect_as_a_head(server: LocalServer, other_server: LocalServer) -> None:
    server.routes["/old"] = redirect(other_server.url("/new"), 302)
    other_server.routes["/new"] = reply(b"content")

    answer = request("HEAD", server.url("/old"), allowed_networks=LOOPBACK)

    assert answer.final_url == other_server.url("/new")
    assert [seen.method for seen in other_server.requests] == ["HEAD"]


def test_delete_sends_its_method_and_body_and_returns_the_answer(server: LocalServer) -> None:
    server.routes["/items/9"] = reply(b"", 204, headers={"X-Deleted": "1"})

    answer = request(
        "DELETE",
        server.url("/items/9"),
        body=b'{"reason": "sold"}',
        content_type="application/json",
        allowed_networks=LOOPBACK,
    )

    assert (answer.status, answer.body, answer.headers["x-deleted"]) == (204, b"", "1")
    [seen] = server.requests
    assert (seen.method, seen.path, seen.body) == ("DELETE", "/items/9", b'{"reason": "sold"}')
    assert seen.headers["Content-Type"] == "application/json"


def test_a_delete_follows_307_with_its_method_and_body(
    server: LocalServer, other_server: LocalServer
) -> None:
    server.routes["/items/9"] = redirect(other_server.url("/v2/items/9"), 307)
    other_server.routes["/v2/items/9"] = reply(b"", 204)

    request("DELETE", server.url("/items/9"), body=b"why", allowed_networks=LOOPBACK)

    [seen] = other_server.requests
    assert (seen.method, seen.body) == ("DELETE", b"why")


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_delete_redirected_elsewhere_than_307_or_308_is_not_followed(
    server: LocalServer, other_server: LocalServer, status: int
) -> None:
    server.routes["/items/9"] = redirect(other_server.url("/items"), status)

    refused(
        lambda: request("DELETE", server.url("/items/9"), allowed_networks=LOOPBACK),
        "FETCH_FAILED",
    )
    answer = request(
        "DELETE", server.url("/items/9"), allowed_networks=LOOPBACK, raise_for_status=False
    )

    assert (answer.status, answer.headers["location"]) == (status, other_server.url("/items"))
    assert other_server.requests == []


def test_a_redirect_past_max_redirects_comes_back_as_the_answer_without_raise_for_status(
    server: LocalServer,
) -> None:
    server.routes["/moved"] = redirect("/elsewhere", 301)

    answer = request(
        "GET",
        server.url("/moved"),
        allowed_networks=LOOPBACK,
        max_redirects=0,
        raise_for_status=False,
    )

    assert (answer.status, answer.headers["location"]) == (301, "/elsewhere")
    assert [seen.path for seen in server.requests] == ["/moved"]


def test_the_size_limit_applies_to_the_body_of_an_error_answer(server: LocalServer) -> None:
    server.routes["/"] = reply(b"x" * 5000, 500)

    refused(
        lambda: request(
            "GET", server.url(), allowed_networks=LOOPBACK, max_bytes=1000, raise_for_status=False
        ),
        "FETCH_TOO_LARGE",
    )


def test_request_refuses_loopback_without_an_allowance_before_any_request(
    server: LocalServer,
) -> None:
    server.routes["/"] = reply(b"", 204)

    refused(
        lambda: request("DELETE", server.url(), allowed_networks=[], raise_for_status=False),
        "URL_NOT_ALLOWED",
    )

    assert server.requests == []


def test_request_checks_a_redirect_hop_before_reaching_it(
    server: LocalServer, other_server: LocalServer
) -> None:
    server.routes["/"] = redirect(other_server.url("/internal"), 307)

    refused(
        lambda: request(
            "DELETE", server.url(), allowed_networks=ONLY_127_0_0_1, raise_for_status=False
        ),
        "URL_NOT_ALLOWED",
    )

    assert len(server.requests) == 1
    assert other_server.requests == []


def test_caller_headers_replace_the_defaults_whatever_their_case(server: LocalServer) -> None:
    server.routes["/"] = reply(b"{}")

    request(
        "GET",
        server.url(),
        headers={"accept": "application/json", "user-agent": "caller/1"},
        allowed_networks=LOOPBACK,
    )

    [seen] = server.requests
    assert seen.headers.get_all("Accept") == ["application/json"]
    assert seen.headers.get_all("User-Agent") == ["caller/1"]


@pytest.mark.parametrize(
    ("method", "options", "why"),
    [
        ("GET", {"body": b"x"}, "has no body"),
        ("HEAD", {"body": b""}, "has no body"),
        ("OPTIONS", {}, "not 'OPTIONS'"),
        ("TRACE", {}, "not 'TRACE'"),
        (
            "DELETE",
            {"content_type": "text/plain", "headers": {"Content-Type": "text/html"}},
            "'Content-Type' is set by omniva.outbound",
        ),
        ("GET", {"headers": {"Host": "elsewhere"}}, "'Host' is set by omniva.outbound"),
    ],
)
def test_requests_that_cannot_be_sent_as_asked_are_refused_before_connecting(
    server: LocalServer, method: str, options: dict, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        request(method, server.url(), allowed_networks=LOOPBACK, **options)

    assert server.requests == []


# --- address_allowed ---------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",  # noqa: S104  (an address checked, not bound)
        "169.254.169.254",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "192.0.2.1",
        "198.18.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",
        "ff02::1",
        "ff0e::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "2002:a00:1::1",  # 6to4 around 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
        "2001:db8::1",
    ],
)
def test_address_allowed_refuses_addresses_that_are_not_public(address: str) -> None:
    assert address_allowed(ip_address(address)) is False


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_address_allowed_allows_public_addresses(address: str) -> None:
    assert address_allowed(ip_address(address)) is True


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("10.0.0.1", "10.0.0.0/8"),
        ("::ffff:10.0.0.1", "10.0.0.0/8"),
        ("127.0.0.1", "0.0.0.0/0"),
        ("fd00::1", "::/0"),
    ],
)
def test_address_allowed_allows_private_addresses_inside_an_allowed_network(
    address: str, network: str
) -> None:
    assert address_allowed(ip_address(address), [ip_network(network)]) is True
    assert address_allowed(ip_address(address), [ip_network("192.0.2.0/24")]) is False


def test_allowed_networks_from_settings_allow_everything_only_when_configured(
    settings,
) -> None:
    settings.OMNIVA_ALLOW_PRIVATE_URLS = False
    assert allowed_networks_from_settings() == []

    settings.OMNIVA_ALLOW_PRIVATE_URLS = True
    networks = allowed_networks_from_settings()
    assert address_allowed(ip_address("10.0.0.1"), networks)
    assert address_allowed(ip_address("::1"), networks)


def test_outbound_errors_are_transient_only_when_the_server_may_recover() -> None:
    transient = {code.value for code in outbound.OutboundCode if OutboundError(code, "m").transient}

    assert transient == {"FETCH_UNAVAILABLE"}


# --- media_path ----------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    (root / "inputs").mkdir(parents=True)
    (root / "inputs" / "cat.png").write_bytes(b"png")
    (tmp_path / "outside.txt").write_text("secret")
    (root / "escape").symlink_to(tmp_path / "outside.txt")
    (root / "escape-dir").symlink_to(tmp_path)
    (root / "alias.png").symlink_to(root / "inputs" / "cat.png")
    return root


def test_media_path_returns_a_file_under_the_root(media_root: Path) -> None:
    assert (
        media_path("inputs/cat.png", root=media_root)
        == (media_root / "inputs" / "cat.png").resolve()
    )


def test_media_path_follows_symlinks_that_stay_inside_the_root(media_root: Path) -> None:
    assert media_path("alias.png", root=media_root) == (media_root / "inputs" / "cat.png").resolve()


def test_media_path_defaults_to_media_root(media_root: Path, settings) -> None:
    settings.MEDIA_ROOT = media_root

    assert media_path("inputs/cat.png") == (media_root / "inputs" / "cat.png").resolve()


@pytest.mark.parametrize(
    "name",
    [
        "../outside.txt",
        "/etc/passwd",
        "inputs/../../outside.txt",
        "escape",
        "escape-dir/outside.txt",
        "inputs/cat.png\x00.txt",
        "",
    ],
)
def test_media_path_refuses_names_that_leave_the_root(media_root: Path, name: str) -> None:
    error = refused(lambda: media_path(name, root=media_root), "PATH_NOT_ALLOWED")

    assert error.transient is False


@pytest.mark.parametrize("name", ["inputs/dog.png", "inputs"])
def test_media_path_reports_a_missing_file(media_root: Path, name: str) -> None:
    error = refused(lambda: media_path(name, root=media_root), "FILE_NOT_FOUND")

    assert error.transient is False
