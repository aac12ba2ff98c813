"""Outbound HTTP to user-given URLs, safe against SSRF, with size and time limits.

Pipelines fetch inputs from, and send outputs to, URLs their callers chose. Left alone,
such a request can be aimed at the server's own network: the cloud metadata service at
169.254.169.254, a database on 10.x, an admin port on localhost. Here every request:

- takes only http and https URLs without userinfo;
- resolves the host once and refuses the request if ANY resolved address is private,
  loopback, link-local, multicast, reserved, unspecified or shared (CGNAT), or embeds
  such an IPv4 address (IPv4-mapped, 6to4, Teredo, NAT64), unless the caller allowed
  its network (`OMNIVA_ALLOW_PRIVATE_URLS` allows all);
- connects to the checked address itself, never to the name again, sending the
  original name as Host and as the TLS server name, so certificates are still checked
  against the name;
- follows redirects itself, checking every hop like the first;
- stops reading a body at `max_bytes` + 1 and gives up once the deadline over the whole
  exchange (connect, TLS, upload, headers, body) has passed.

`request` is the one way a request is made; `fetch` (GET) and `send` (POST, PUT, PATCH
with a body) are its common cases. `check` applies the same refusals to a URL without
sending anything, for a URL that is used later or by another client (boto3). Failures
are `OutboundError`s with a stable code and a `transient` flag that tells a stage
whether trying again later can help; with `raise_for_status=False` an HTTP answer of
any status is a result instead. `media_path` is the same guard for file names under
MEDIA_ROOT.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urljoin, urlsplit

from django.conf import settings

from omniva import __version__

__all__ = [
    "Fetched",
    "OutboundCode",
    "OutboundError",
    "address_allowed",
    "allowed_networks_from_settings",
    "check",
    "fetch",
    "media_path",
    "request",
    "send",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Only these keep the method and the body (RFC 9110 15.4); a PUT answered with 301, 302
# or 303 would become a GET that silently drops the upload, and a DELETE answered with
# 303 is asked to GET another resource, so only GET and HEAD follow those.
BODY_PRESERVING_REDIRECTS = frozenset({307, 308})
SAFE_METHODS = frozenset({"GET", "HEAD"})
SEND_METHODS = frozenset({"POST", "PUT", "PATCH"})
METHODS = SAFE_METHODS | SEND_METHODS | {"DELETE"}

_CHUNK = 64 * 1024
_USER_AGENT = f"omniva/{__version__}"
# Set from the URL and the body; a caller's value would contradict them (a Host other
# than the name we checked and verify the certificate against, a wrong length).
_MANAGED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# Dropped when a redirect leaves the origin, so a redirect cannot forward credentials
# meant for the first host to another one.
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
# A last label that is a number makes the whole host a (possibly legacy) IPv4 literal,
# as browsers parse it: 2130706433, 0x7f000001, 127.1, 0177.0.0.1.
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
# Everything printable stays as given; only non-ASCII (and the few characters no request
# line may carry) is percent-encoded, so an already encoded URL is sent unchanged.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


class OutboundCode(StrEnum):
    URL_NOT_ALLOWED = "URL_NOT_ALLOWED"
    FETCH_FAILED = "FETCH_FAILED"
    FETCH_UNAVAILABLE = "FETCH_UNAVAILABLE"
    FETCH_TOO_LARGE = "FETCH_TOO_LARGE"
    PATH_NOT_ALLOWED = "PATH_NOT_ALLOWED"
    FILE_NOT_FOUND = "FILE_NOT_FOUND"


# Only a server that is there but busy or slow can answer differently later; an address
# that is refused, unreachable or answers 4xx will not.
_TRANSIENT_CODES = frozenset({OutboundCode.FETCH_UNAVAILABLE})


class OutboundError(Exception):
    """A refused or failed outbound request; `code` is one of `OutboundCode`.

    `transient` says whether the same request may succeed later (timeouts, resets, 5xx,
    429); `status` is the HTTP status when the failure is the server's answer.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        transient: bool | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = OutboundCode(code)
        self.message = message
        self.transient = self.code in _TRANSIENT_CODES if transient is None else transient
        self.status = status

    def __repr__(self) -> str:
        return f"OutboundError({self.code.value!r}, {self.message!r})"


@dataclass
class Fetched:
    body: bytes
    content_type: str | None  # the header as sent, parameters included; None if absent
    final_url: str  # after redirects
    status: int
    # Lower-cased names; a header sent more than once has its values joined with ", ".
    headers: dict[str, str] = field(default_factory=dict)

    def status_error(self) -> OutboundError | None:
        """What this answer's status means as a failure: None for 2xx, else the
        OutboundError a non-2xx answer raises by default (FETCH_UNAVAILABLE and transient
        for 5xx, 408 and 429; FETCH_FAILED for the rest)."""
        if 200 <= self.status < 300:
            return None
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = ""
        return _status_error(self.status, reason, self.final_url)


# --- addresses ---------------------------------------------------------------------


def _as_address(address: IPAddress | str) -> IPAddress:
    return ipaddress.ip_address(address) if isinstance(address, str) else address


def _as_networks(networks: Sequence[IPNetwork | str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(n) if isinstance(n, str) else n for n in networks]


def _is_special(address: IPAddress) -> bool:
    # is_global alone misses multicast (224.0.0.1 counts as global) and the exact lists
    # behind it have changed between Python releases, so every category is named.
    return (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address in _SHARED_ADDRESS_SPACE
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    # Transition prefixes carry an IPv4 address that a relay or gateway on the path may
    # deliver to; a 6to4 address around 10.0.0.1 must not pass as public IPv6.
    embedded = []
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address.teredo is not None:
        embedded.extend(address.teredo)
    if address in _NAT64_WELL_KNOWN:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return embedded


def address_allowed(
    address: IPAddress | str, allowed_networks: Sequence[IPNetwork | str] = ()
) -> bool:
    """Whether an outbound connection to `address` is allowed.

    Public unicast addresses are; private, loopback, link-local (the metadata service
    169.254.169.254 included), multicast, reserved, unspecified, shared (100.64/10),
    unique-local and site-local ones are not, nor IPv6 addresses that are or embed one
    of those (::ffff:127.0.0.1, 6to4, Teredo, NAT64), unless the address is inside
    one of `allowed_networks`.
    """
    address = _as_address(address)
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    # ::ffff:a.b.c.d is the IPv4 host a.b.c.d reached through an IPv6 socket: judge it
    # as that host, for the allowance as well as for the refusal.
    candidates = [address] if mapped is None else [address, mapped]
    networks = _as_networks(allowed_networks)
    if any(candidate in network for candidate in candidates for network in networks):
        return True
    effective = mapped or address
    if _is_special(effective):
        return False
    if isinstance(effective, ipaddress.IPv6Address):
        return not any(_is_special(v4) for v4 in _embedded_ipv4(effective))
    return True


def allowed_networks_from_settings() -> list[IPNetwork]:
    """Every address when OMNIVA_ALLOW_PRIVATE_URLS is on (a trusted, private setup),
    else none beyond the public ones."""
    if settings.OMNIVA_ALLOW_PRIVATE_URLS:
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    return []


# --- URLs and resolution -----------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # resolved, and sent as Host and TLS server name; IPv4 forms normalised
    port: int
    path: str  # path and query, fragment dropped

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def _redacted(url: str) -> str:
    # Query strings of upload URLs carry signatures (presigned PUTs); messages end up in
    # job errors and logs, so they show scheme, host and path only.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else "(URL)"


def _not_allowed(message: str) -> OutboundError:
    return OutboundError(OutboundCode.URL_NOT_ALLOWED, message)


def _parse(url: str) -> _Target:
    if not isinstance(url, str) or not url:
        raise _not_allowed("URL is empty")
    # urlsplit quietly strips some whitespace and control characters (WHATWG style)
    # that other parsers keep; a URL that parsers could read differently is refused.
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url) or "\\" in url:
        raise _not_allowed("URL contains whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _not_allowed(f"URL is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _not_allowed(f"URL scheme {scheme or '(none)'!r} is not allowed; use http(s)")
    if "@" in parts.netloc:
        raise _not_allowed("URLs with user information (user:password@) are not allowed")
    host = parts.hostname
    if not host:
        raise _not_allowed("URL has no host")
    if port == 0:
        raise _not_allowed("URL port 0 is not allowed")
    port = port or (443 if scheme == "https" else 80)
    host = _normalised_host(host)
    path = quote(parts.path or "/", safe=_URL_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_URL_SAFE)
    return _Target(url=url, scheme=scheme, host=host, port=port, path=path)


def _normalised_host(host: str) -> str:
    if ":" in host:  # from brackets: an IPv6 literal, which urlsplit has validated
        return host
    name = host.removesuffix(".")
    if name and _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        # Decimal, hex and octal IPv4 forms are normalised here rather than left to the
        # C library, so they are checked as the address they spell on every libc.
        try:
            return socket.inet_ntoa(socket.inet_aton(name))
        except OSError as exc:
            raise _not_allowed(f"URL host {host!r} is not a valid IPv4 address") from exc
    # Outside ASCII anything goes: IDNA encodes it for DNS, Host and SNI alike.
    if not name or not all(ord(c) > 0x7F or c.isalnum() or c in "._-" for c in name):
        raise _not_allowed(f"URL host {host!r} is not a valid host name")
    return host


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return None


def _resolve(target: _Target, networks: Sequence[IPNetwork]) -> list[tuple[int, tuple]]:
    """The (family, sockaddr) pairs to connect to, every one of them checked."""
    literal = _literal(target.host)
    if literal is not None and not address_allowed(literal, networks):
        raise _not_allowed(f"address {literal} is not allowed")
    try:
        infos = socket.getaddrinfo(
            target.host, target.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except UnicodeError as exc:
        raise _not_allowed(f"URL host {target.host!r} is not a valid host name") from exc
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise OutboundError(
                OutboundCode.FETCH_UNAVAILABLE,
                f"could not resolve {target.host!r} right now: {exc.strerror}",
            ) from exc
        raise OutboundError(
            OutboundCode.FETCH_FAILED, f"could not resolve {target.host!r}: {exc.strerror}"
        ) from exc
    addresses: list[tuple[int, tuple]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = _literal(str(sockaddr[0]))
        if address is None:
            continue
        # One refused address refuses the host, rather than connecting to the others:
        # a name that mixes a public and an internal address is an attack or a
        # misconfiguration either way, and the outcome must not depend on record order.
        if not address_allowed(address, networks):
            raise _not_allowed(
                f"host {target.host!r} resolves to an address that is not allowed "
                "(private, loopback, link-local or reserved)"
            )
        if (family, sockaddr) not in addresses:
            addresses.append((family, sockaddr))
    if not addresses:
        raise OutboundError(OutboundCode.FETCH_FAILED, f"{target.host!r} has no IP address")
    return addresses


# --- connections -------------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        # A per-read timeout alone lets a server that drips a byte now and then hold the
        # fetch forever; every read only gets what is left of the whole deadline.
        self._sock.settimeout(self._deadline.remaining())
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The part of a socket http.client uses, with every operation under the deadline.

    close() leaves the socket open: http.client closes its connection as soon as the
    headers say Connection: close, while the body is still to be read; the request
    code closes the real socket when it is done.
    """

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        # Since Python 3.5 a socket timeout bounds the whole sendall, not each send.
        self._sock.settimeout(self._deadline.remaining())
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        pass


@cache
def _default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to addresses resolved and checked beforehand.

    http.client would resolve the host again in connect(); a DNS answer that changed
    since the check (rebinding, a TTL of 0) would then reach an address nobody checked.
    """

    def __init__(
        self, target: _Target, addresses: list[tuple[int, tuple]], deadline: _Deadline
    ) -> None:
        super().__init__(target.host, target.port)
        self._addresses = addresses
        self._deadline = deadline
        self.raw_sock: socket.socket | None = None

    def connect(self) -> None:
        last_error: OSError = ConnectionRefusedError("no address to connect to")
        for family, sockaddr in self._addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self._deadline.remaining())
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                last_error = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.raw_sock = self._secure(sock)
            self.sock = _DeadlineSocket(self.raw_sock, self._deadline)
            return
        raise last_error

    def _secure(self, sock: socket.socket) -> socket.socket:
        return sock

    def close_socket(self) -> None:
        self.close()
        if self.raw_sock is not None:
            self.raw_sock.close()
            self.raw_sock = None


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def __init__(
        self,
        target: _Target,
        addresses: list[tuple[int, tuple]],
        deadline: _Deadline,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(target, addresses, deadline)
        self._context = context

    def _secure(self, sock: socket.socket) -> socket.socket:
        try:
            sock.settimeout(self._deadline.remaining())
            # The name, not the address we connected to: SNI and the certificate check
            # are about the host the caller asked for.
            return self._context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise OutboundError(
                OutboundCode.FETCH_FAILED,
                f"TLS certificate of {self.host!r} is not valid: {exc.verify_message}",
            ) from exc
        except (TimeoutError, ConnectionResetError):
            sock.close()
            raise
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise OutboundError(
                OutboundCode.FETCH_FAILED, f"TLS handshake with {self.host!r} failed: {exc}"
            ) from exc


# --- requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    max_bytes: int
    timeout_s: float
    networks: list[IPNetwork]
    max_redirects: int
    ssl_context: ssl.SSLContext


def _options(
    max_bytes: int | None,
    timeout_s: float | None,
    allowed_networks: Sequence[IPNetwork | str] | None,
    max_redirects: int,
    ssl_context: ssl.SSLContext | None,
) -> _Options:
    max_bytes = settings.OMNIVA_FETCH_MAX_BYTES if max_bytes is None else max_bytes
    timeout_s = settings.OMNIVA_FETCH_TIMEOUT_S if timeout_s is None else timeout_s
    if max_bytes < 0:
        raise ValueError("max_bytes must not be negative")
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    if max_redirects < 0:
        raise ValueError("max_redirects must not be negative")
    networks = (
        allowed_networks_from_settings()
        if allowed_networks is None
        else _as_networks(allowed_networks)
    )
    return _Options(
        max_bytes=max_bytes,
        timeout_s=float(timeout_s),
        networks=networks,
        max_redirects=max_redirects,
        ssl_context=ssl_context or _default_ssl_context(),
    )


def _request_headers(headers: Mapping[str, str] | None, content_type: str | None) -> dict[str, str]:
    """Our defaults, then the caller's headers (replacing a default of the same name in
    any case), then Content-Type when `content_type` gives it."""
    managed = _MANAGED_HEADERS | ({"content-type"} if content_type is not None else set())
    given: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if name.lower() in managed:
            raise ValueError(f"header {name!r} is set by omniva.outbound, not by the caller")
        given[name] = value
    # http.client sends both of "Accept" and "accept"; a server may read either.
    replaced = {name.lower() for name in given}
    result = {name: v for name, v in _base_headers().items() if name.lower() not in replaced}
    result |= given
    if content_type is not None:
        result["Content-Type"] = content_type
    return result


def _status_error(status: int, reason: str, url: str) -> OutboundError:
    message = f"{_redacted(url)} answered HTTP {status} {reason}".rstrip()
    # 408 and 429 are the server asking to come back later; other 4xx will not change.
    if status >= 500 or status in (408, 429):
        return OutboundError(OutboundCode.FETCH_UNAVAILABLE, message, status=status)
    return OutboundError(OutboundCode.FETCH_FAILED, message, status=status)


def _read_body(
    response: http.client.HTTPResponse, max_bytes: int, deadline: _Deadline, url: str
) -> bytes:
    too_large = OutboundError(
        OutboundCode.FETCH_TOO_LARGE, f"{_redacted(url)} is larger than {max_bytes} bytes"
    )
    if response.length is not None and response.length > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    total = 0
    while True:
        deadline.remaining()
        # At most one byte past the limit: enough to know it is too large, no more.
        chunk = response.read(min(_CHUNK, max_bytes + 1 - total))
        if not chunk:
            # read(amt) answers a connection closed before Content-Length with b"" rather
            # than IncompleteRead; a truncated image must not pass as a whole one.
            if response.length:
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise too_large
        chunks.append(chunk)


def _response_headers(response: http.client.HTTPResponse) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in response.msg.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _fetched(
    response: http.client.HTTPResponse, max_bytes: int, deadline: _Deadline, url: str
) -> Fetched:
    return Fetched(
        body=_read_body(response, max_bytes, deadline, url),
        content_type=response.getheader("Content-Type"),
        final_url=url,
        status=response.status,
        headers=_response_headers(response),
    )


@contextmanager
def _exchange(
    method: str,
    target: _Target,
    body: bytes | None,
    headers: dict[str, str],
    options: _Options,
    deadline: _Deadline,
) -> Iterator[http.client.HTTPResponse]:
    """One request on a connection of its own to the checked addresses; the response is
    read inside the block, and the socket closed when it ends."""
    addresses = _resolve(target, options.networks)
    if target.scheme == "https":
        conn: _PinnedHTTPConnection = _PinnedHTTPSConnection(
            target, addresses, deadline, options.ssl_context
        )
    else:
        conn = _PinnedHTTPConnection(target, addresses, deadline)
    try:
        conn.request(method, target.path, body=body, headers=headers)
        yield conn.getresponse()
    finally:
        conn.close_socket()


def _location_to_follow(
    response: http.client.HTTPResponse,
    method: str,
    redirects: int,
    options: _Options,
    urls: tuple[str, str],
    raise_for_status: bool,
) -> str | None:
    """The Location to follow from `response`, or None when the response is the answer.

    `urls` are the first URL and the one that answered. With `raise_for_status` an
    answer outside 2xx raises, a redirect that is not followed included.
    """
    first_url, url = urls
    status = response.status
    if status not in REDIRECT_STATUSES:
        if raise_for_status and not 200 <= status < 300:
            raise _status_error(status, response.reason, url)
        return None
    location = response.getheader("Location")
    followed = REDIRECT_STATUSES if method in SAFE_METHODS else BODY_PRESERVING_REDIRECTS
    if status not in followed:
        why = f"redirected a {method} with HTTP {status}, which may not keep its method and body"
        refusal = f"{_redacted(url)} {why}; not followed"
    elif not location:
        refusal = f"{_redacted(url)} answered HTTP {status} without a Location"
    elif redirects >= options.max_redirects:
        refusal = f"more than {options.max_redirects} redirects from {_redacted(first_url)}"
    else:
        return location
    if raise_for_status:
        raise OutboundError(OutboundCode.FETCH_FAILED, refusal, status=status)
    return None


def _request(
    method: str,
    url: str,
    *,
    body: bytes | None,
    headers: dict[str, str],
    options: _Options,
    raise_for_status: bool,
) -> Fetched:
    deadline = _Deadline(options.timeout_s)
    target = _parse(url)
    redirects = 0
    while True:
        try:
            with _exchange(method, target, body, headers, options, deadline) as response:
                location = _location_to_follow(
                    response, method, redirects, options, (url, target.url), raise_for_status
                )
                if location is None:
                    return _fetched(response, options.max_bytes, deadline, target.url)
        except (OSError, http.client.HTTPException) as exc:
            raise _transport_error(exc, target.url) from exc
        redirects += 1
        # Every hop is parsed, resolved and checked like the first: a public server can
        # redirect to http://169.254.169.254/ as easily as a user can type it.
        next_target = _parse(urljoin(target.url, location))
        if next_target.origin != target.origin:
            headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
        target = next_target


def _transport_error(exc: OSError | http.client.HTTPException, url: str) -> OutboundError:
    where = _redacted(url)
    if isinstance(exc, TimeoutError):
        return OutboundError(OutboundCode.FETCH_UNAVAILABLE, f"{where} timed out")
    if isinstance(exc, ConnectionRefusedError):
        return OutboundError(OutboundCode.FETCH_FAILED, f"{where} refused the connection")
    # Checked before OSError: RemoteDisconnected is a ConnectionResetError too.
    if isinstance(
        exc,
        http.client.IncompleteRead
        | ConnectionResetError
        | ConnectionAbortedError
        | BrokenPipeError
        | ssl.SSLEOFError,
    ):
        return OutboundError(
            OutboundCode.FETCH_UNAVAILABLE, f"connection to {where} broke off: {exc!r}"
        )
    if isinstance(exc, http.client.HTTPException | ssl.SSLError):
        return OutboundError(OutboundCode.FETCH_FAILED, f"{where} sent a bad response: {exc!r}")
    # Unreachable networks and hosts: not retried, like an unknown name.
    return OutboundError(OutboundCode.FETCH_FAILED, f"could not connect to {where}: {exc}")


def _base_headers() -> dict[str, str]:
    return {"User-Agent": _USER_AGENT, "Accept": "*/*", "Connection": "close"}


def request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
    headers: Mapping[str, str] | None = None,
    max_bytes: int | None = None,
    timeout_s: float | None = None,
    allowed_networks: Sequence[IPNetwork | str] | None = None,
    max_redirects: int = 5,
    raise_for_status: bool = True,
    ssl_context: ssl.SSLContext | None = None,
) -> Fetched:
    """One HTTP request with `method` (GET, HEAD, POST, PUT, PATCH or DELETE) to `url`.

    `body` goes with any method but GET and HEAD; `content_type` is sent as
    Content-Type (and may then not be in `headers`). GET and HEAD follow up to
    `max_redirects` redirects of every kind with the same method; the other methods
    follow only 307 and 308, resending method and body, since 301, 302 and 303 may turn
    them into a body-less GET. Every hop is checked like the first.

    With `raise_for_status` (the default) an answer outside 2xx raises OutboundError:
    FETCH_UNAVAILABLE (transient) for 5xx, 408 and 429, FETCH_FAILED for the rest and
    for a redirect that is not followed, with `status` set. Without it any answer is
    returned, with its status, headers and body, a redirect that is not followed
    included. Either way a refused URL, a transport failure, a body over `max_bytes`
    (error answers' too) and the deadline raise.

    `max_bytes` and `timeout_s` default to OMNIVA_FETCH_MAX_BYTES and
    OMNIVA_FETCH_TIMEOUT_S; the timeout is a deadline over the whole exchange, upload
    and redirects included (DNS lookups are bounded by the system resolver's own
    timeouts). `allowed_networks` None means `allowed_networks_from_settings()`; pass
    networks to reach private addresses on purpose. Host, Content-Length,
    Transfer-Encoding and Connection are set here, not in `headers`; Authorization and
    Cookie are dropped when a redirect leaves the origin.
    """
    method = method.upper()
    if method not in METHODS:
        raise ValueError(f"request() takes {', '.join(sorted(METHODS))}, not {method!r}")
    if body is not None and method in SAFE_METHODS:
        raise ValueError(f"a {method} request has no body")
    options = _options(max_bytes, timeout_s, allowed_networks, max_redirects, ssl_context)
    return _request(
        method,
        url,
        body=None if body is None else bytes(body),
        headers=_request_headers(headers, content_type),
        options=options,
        raise_for_status=raise_for_status,
    )


def fetch(
    url: str,
    *,
    max_bytes: int | None = None,
    timeout_s: float | None = None,
    allowed_networks: Sequence[IPNetwork | str] | None = None,
    max_redirects: int = 5,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Fetched:
    """GET `url` and return its 2xx answer: `request("GET", url, ...)`."""
    return request(
        "GET",
        url,
        headers=headers,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        allowed_networks=allowed_networks,
        max_redirects=max_redirects,
        ssl_context=ssl_context,
    )


def send(
    method: str,
    url: str,
    *,
    body: bytes,
    content_type: str,
    max_bytes: int | None = None,
    timeout_s: float | None = None,
    allowed_networks: Sequence[IPNetwork | str] | None = None,
    max_redirects: int = 5,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Fetched:
    """Send `body` with POST, PUT or PATCH to `url` and return the 2xx answer:
    `request(method, url, body=body, content_type=content_type, ...)`, which follows
    only 307 and 308 redirects for these methods."""
    method = method.upper()
    if method not in SEND_METHODS:
        raise ValueError(f"send() takes {', '.join(sorted(SEND_METHODS))}, not {method!r}")
    return request(
        method,
        url,
        body=body,
        content_type=content_type,
        headers=headers,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        allowed_networks=allowed_networks,
        max_redirects=max_redirects,
        ssl_context=ssl_context,
    )


def check(url: str, *, allowed_networks: Sequence[IPNetwork | str] | None = None) -> None:
    """Refuse `url` as `request` would, without connecting: OutboundError URL_NOT_ALLOWED
    for a URL that is not plain http(s) or whose host is, or resolves to, an address
    that is not allowed; FETCH_FAILED or FETCH_UNAVAILABLE (transient) for a name that
    does not resolve.

    The answer holds for this moment: DNS may answer otherwise later, and redirects are
    only known when the request is made, so `request` checks again when it sends. It
    lets a pipeline refuse a URL before doing the work whose result goes there, and
    guards a URL handed to a client that connects by itself (boto3), where the name is
    resolved again when it connects.
    """
    networks = (
        allowed_networks_from_settings()
        if allowed_networks is None
        else _as_networks(allowed_networks)
    )
    _resolve(_parse(url), networks)


# --- files -------------------------------------------------------------------------


def media_path(name: str, *, root: Path | None = None) -> Path:
    """The existing regular file `name` (relative, '/'-separated) under MEDIA_ROOT or
    `root`, with symlinks resolved.

    Raises OutboundError PATH_NOT_ALLOWED for absolute names, '..' components, NUL
    bytes and symlinks that lead out of the root, FILE_NOT_FOUND when nothing (or no
    regular file) is there. The check is on the path as it is now: whoever can write
    under the root can swap a component afterwards, so only the server should.
    """

    def refuse(why: str) -> OutboundError:
        return OutboundError(OutboundCode.PATH_NOT_ALLOWED, f"file name {name!r} {why}")

    if not isinstance(name, str) or not name:
        raise refuse("is empty")
    if "\x00" in name:
        raise refuse("contains a NUL byte")
    relative = PurePosixPath(name)
    if relative.is_absolute():
        raise refuse("is absolute")
    # Refused even where it would stay inside (a/../b): no caller needs it, and it
    # would walk through directories that may be symlinks.
    if ".." in relative.parts:
        raise refuse("contains '..'")
    base = Path(settings.MEDIA_ROOT if root is None else root).resolve()
    try:
        resolved = (base / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise refuse("cannot be resolved") from exc
    if not resolved.is_relative_to(base):
        raise refuse("leads outside the media root")
    if not resolved.is_file():
        raise OutboundError(OutboundCode.FILE_NOT_FOUND, f"file {name!r} does not exist")
    return resolved
