"""The SSRF guard: which addresses a request may reach, how a URL is parsed and its host
resolved (every address checked), and `check`, the same refusals without a request."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from django.conf import settings

from omniva.outbound.errors import OutboundCode, OutboundError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
# A last label that is a number makes the whole host a (possibly legacy) IPv4 literal,
# as browsers parse it: 2130706433, 0x7f000001, 127.1, 0177.0.0.1.
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
# Everything printable stays as given; only non-ASCII (and the few characters no request
# line may carry) is percent-encoded, so an already encoded URL is sent unchanged.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"


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
