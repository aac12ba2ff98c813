"""Per-caller rate limit: a leaky bucket kept in PostgreSQL, so every node shares it."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from omniva import services
from omniva.models import ApiKey


def bucket_name(request: Request) -> str:
    if isinstance(request.auth, ApiKey):
        return f"key:{request.auth.pk}"
    user = request.user
    if user is not None and user.is_authenticated and user.pk is not None:
        return f"user:{user.pk}"
    return f"ip:{request.META.get('REMOTE_ADDR', '')}"


class LeakyBucketThrottle(BaseThrottle):
    """`OMNIVA_RATE_LIMIT` requests per second, bursts up to `OMNIVA_RATE_BURST`."""

    def __init__(self) -> None:
        self._wait: float | None = None

    def allow_request(self, request: Request, view: Any) -> bool:
        self._wait = services.rate_limit_take(
            bucket=bucket_name(request),
            rate_per_s=settings.OMNIVA_RATE_LIMIT,
            burst=settings.OMNIVA_RATE_BURST,
        )
        return self._wait is None

    def wait(self) -> float | None:
        return self._wait
