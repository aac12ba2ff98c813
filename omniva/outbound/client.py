"""`request`, the one way an outbound request is made, and its common cases `fetch` and
`send`: headers, redirects (every hop checked like the first), size and time limits."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urljoin, urlsplit

from django.conf import settings

from omniva import __version__
from omniva.outbound.connections import (
    _Deadline,
    _default_ssl_context,
    _PinnedHTTPConnection,
    _PinnedHTTPSConnection,
)
from omniva.outbound.errors import OutboundCode, OutboundError
from omniva.outbound.guard import (
    IPNetwork,
    _as_networks,
    _parse,
    _resolve,
    _Target,
    allowed_networks_from_settings,
)

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


def _redacted(url: str) -> str:
    # Query strings of upload URLs carry signatures (presigned PUTs); messages end up in
    # job errors and logs, so they show scheme, host and path only.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.netloc else "(URL)"


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
