"""DRF's throttle over the per-caller rate limit (omniva/rate_limits.py): a request's
bucket is its API key, else its user, else its address."""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from omniva.access import api_key_bucket
from omniva.models import ApiKey
from omniva.rate_limits import rate_limit_spend


def bucket_name(request: Request) -> str:
    if isinstance(request.auth, ApiKey):
        return api_key_bucket(request.auth)
    user = request.user
    if user is not None and user.is_authenticated and user.pk is not None:
        return f"user:{user.pk}"
    return f"ip:{request.META.get('REMOTE_ADDR', '')}"


class LeakyBucketThrottle(BaseThrottle):
    """`OMNIVA_RATE_LIMIT` requests per second, bursts up to `OMNIVA_RATE_BURST`."""

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        self._wait = rate_limit_spend(bucket_name(request))
        return self._wait is None

    def wait(self) -> float | None:
        return self._wait
