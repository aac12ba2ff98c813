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

The modules: `guard` (addresses, URLs, resolution, `check`), `connections` (pinned to the
checked addresses, under the deadline), `client` (`request`, `fetch`, `send`), `errors`,
`files` (`media_path`); this package re-exports them, so callers write
`from omniva import outbound` and `outbound.fetch(...)`.
"""

from __future__ import annotations

from omniva.outbound.client import Fetched, fetch, request, send
from omniva.outbound.errors import OutboundCode, OutboundError
from omniva.outbound.files import media_path
from omniva.outbound.guard import address_allowed, allowed_networks_from_settings, check

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
