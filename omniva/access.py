"""Who is calling: the one API-key check of every transport. REST's authentication,
the websockets of the live stream and gRPC all call `api_key_authenticate` (the key is
valid, not revoked, and marked used); the websockets and gRPC then call
`api_key_admit` (the key has the scope and is within its rate limit), which REST does
with its permission classes and its throttle over the same bucket."""

from __future__ import annotations

import math

from omniva import selectors, services
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import ApiKey
from omniva.rate_limits import rate_limit_spend


def api_key_bucket(key: ApiKey) -> str:
    """The key's rate-limit bucket: one allowance over every transport."""
    return f"key:{key.pk}"


def api_key_authenticate(*, raw: str) -> ApiKey:
    """The key whose secret is `raw`, marked used; UNAUTHENTICATED when there is none or
    it was revoked."""
    key = selectors.api_key_for_secret(raw)
    if key is None:
        raise OmnivaError(ErrorCode.UNAUTHENTICATED, "The API key is not valid.")
    if not key.is_active:
        raise OmnivaError(ErrorCode.UNAUTHENTICATED, "The API key has been revoked.")
    services.api_key_mark_used(key=key)
    return key


def api_key_admit(*, key: ApiKey, scope: str) -> None:
    """PERMISSION_DENIED when the key lacks `scope`; RATE_LIMITED (with how long to wait)
    when it is over its rate; else one request of its allowance is spent."""
    if not key.has_scope(scope):
        raise OmnivaError(ErrorCode.PERMISSION_DENIED, f"This key lacks the scope {scope}.")
    wait = rate_limit_spend(api_key_bucket(key))
    if wait is not None:
        raise OmnivaError(
            ErrorCode.RATE_LIMITED,
            "Too many requests for this key; slow down.",
            retry_after_s=max(1, math.ceil(wait)),
        )
