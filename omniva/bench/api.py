"""The `api` suite of `manage.py bench`: what the /v1 conventions cost a request.

The same authenticated GET served by the full middleware stack and without the audit
middleware, in interleaved rounds so that machine noise hits every variant alike. It
runs in-process (Django's test client), so the audit row is written before the call
returns; in a web process it joins a batch, so these figures are the upper bound of
what a client can see. It also times each convention as a web process pays it: the
rate limit charged in chunks, the API key looked up and cached, the audit row alone
and in a batch of 100.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.test import Client
from django.test.utils import override_settings, setup_test_environment
from django.utils import timezone

from omniva import selectors as core_selectors
from omniva import services
from omniva.models import ApiKey, AuditRecord, Scope
from omniva.rate_limits import Allowances

AUDIT = "omniva.api.middleware.AuditMiddleware"
PATH = "/v1/projects"


def time_requests(client: Client, requests: int) -> float:
    """Seconds for `requests` GETs of PATH; the last one must answer 200."""
    started = time.perf_counter()
    for _ in range(requests):
        response = client.get(PATH)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.content
    return elapsed


def per_call_ms(call: Callable[[], Any], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) * 1000 / repeat


@dataclass
class ApiBench:
    requests: int = 400
    rounds: int = 5
    samples: dict[str, list[float]] = field(default_factory=dict)
    # What each convention costs per request, in ms, by what the table calls it.
    conventions: dict[str, float] = field(default_factory=dict)
    take_ms: float = 0.0
    audited: int = 0

    def run(self) -> None:
        setup_test_environment()  # lets the test client use the 'testserver' host
        key, secret = services.api_key_create(name=f"bench-{time.time_ns()}", scopes=[Scope.ADMIN])
        stack = list(settings.MIDDLEWARE)
        variants = {
            "full stack": stack,
            "without audit": [m for m in stack if m != AUDIT],
        }
        self.samples = {name: [] for name in variants}
        requests = self.requests
        # A rate limit high enough never to refuse the benchmark itself.
        with override_settings(OMNIVA_RATE_LIMIT=1e9, OMNIVA_RATE_BURST=10**9):
            for _ in range(self.rounds):
                for name, middleware in variants.items():
                    with override_settings(MIDDLEWARE=middleware):
                        # A new client builds its middleware chain from the setting.
                        client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
                        client.get(PATH)
                        self.samples[name].append(requests / time_requests(client, requests))
            self.take_ms = per_call_ms(
                lambda: services.rate_limit_take(bucket="bench", rate_per_s=1e9, burst=10**9),
                requests,
            )
            # What a web process pays for each convention (omniva/handler.py): the
            # limiter charged in chunks, the key cached, the audit row batched.
            allowances = Allowances()
            spend_ms = per_call_ms(
                lambda: allowances.take("bench-chunked", rate_per_s=1e6, burst=10**6), requests
            )

        def forget_and_look_up() -> None:
            core_selectors.api_keys_forget()
            core_selectors.api_key_for_secret(secret)

        lookup_ms = per_call_ms(forget_and_look_up, requests)
        cached_ms = per_call_ms(lambda: core_selectors.api_key_for_secret(secret), requests)
        row = {
            "request_id": "bench-audit", "at": timezone.now(), "api_key": key,
            "key_name": key.name, "user": None, "method": "GET", "path": PATH,
            "status": 200, "duration_ms": 1.0, "remote_addr": "127.0.0.1", "entity_ids": [],
        }  # fmt: skip
        single_ms = per_call_ms(lambda: services.audit_record_write(**row), requests)
        batched_ms = (
            per_call_ms(
                lambda: services.audit_records_write(records=[row] * 100), max(1, requests // 100)
            )
            / 100
        )
        AuditRecord.objects.filter(request_id="bench-audit").delete()
        self.audited = AuditRecord.objects.filter(api_key=key).count()
        AuditRecord.objects.filter(api_key=key).delete()
        ApiKey.objects.filter(pk=key.pk).delete()
        self.conventions = {
            "rate limit, charged in chunks (Allowances)": spend_ms,
            "API key, looked up (cache forgotten)": lookup_ms,
            "API key, cached": cached_ms,
            "audit row, written alone (COPY + commit)": single_ms,
            "audit row, in a batch of 100 (web process)": batched_ms,
        }

    def report(self) -> list[str]:
        base = statistics.median(self.samples["full stack"])
        lines = [
            f"\nbench api: GET {PATH}, {self.rounds} rounds x {self.requests} requests",
            f"{'variant':<22}{'req/s (median)':>16}{'ms/request':>12}{'vs full':>9}",
        ]
        for name, values in self.samples.items():
            rate = statistics.median(values)
            lines.append(f"{name:<22}{rate:>16.0f}{1000 / rate:>12.2f}{rate / base:>8.2f}x")
        lines.append(f"rate-limit check (one UPSERT): {self.take_ms:.3f} ms per request")
        lines.append("what a web process pays per request for each convention:")
        for name, value in self.conventions.items():
            lines.append(f"  {name:<46}{value:>8.3f} ms")
        lines.append(f"audit rows written by the full-stack rounds: {self.audited}")
        return lines
