"""`manage.py bench [api]`: benchmarks that print tables of side-by-side ratios.

`api` measures what the /v1 conventions cost a request: the same authenticated GET
served by the full middleware stack, without the audit middleware, and without the
rate limiter, in interleaved rounds so that machine noise hits every variant alike.
It runs in-process (Django's test client), so the audit row is written before the
call returns; under daphne it is written after the response is sent, so these
figures are the upper bound of what a client can see.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import connections
from django.test import Client
from django.test.utils import override_settings, setup_test_environment

from omniva import services
from omniva.embedded_db import EmbeddedServer
from omniva.models import ApiKey, AuditRecord, Scope

AUDIT = "omniva.api.middleware.AuditMiddleware"


class Command(BaseCommand):
    help = "Run benchmarks and print their tables (see docs/benchmarks.md)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("suite", nargs="?", default="api", choices=["api"])
        parser.add_argument(
            "--requests", type=int, default=400, help="Requests per variant per round."
        )
        parser.add_argument("--rounds", type=int, default=5)

    def handle(self, *args: Any, **options: Any) -> None:
        database = None
        if not settings.DATABASE_URL:
            database = EmbeddedServer(
                settings.VAR_DIR / "pg", database=settings.DATABASES["default"]["NAME"]
            )
            database.start(owner_pid=os.getpid())
        try:
            call_command("migrate", interactive=False, verbosity=0)
            self.bench_api(options["requests"], options["rounds"])
        finally:
            connections.close_all()
            if database is not None and database.owned_by(os.getpid()):
                database.stop()

    def bench_api(self, requests: int, rounds: int) -> None:
        setup_test_environment()  # lets the test client use the 'testserver' host
        key, secret = services.api_key_create(name=f"bench-{time.time_ns()}", scopes=[Scope.ADMIN])
        stack = list(settings.MIDDLEWARE)
        variants = {
            "full stack": stack,
            "without audit": [m for m in stack if m != AUDIT],
        }
        samples: dict[str, list[float]] = {name: [] for name in variants}
        # A rate limit high enough never to refuse the benchmark itself.
        with override_settings(OMNIVA_RATE_LIMIT=1e9, OMNIVA_RATE_BURST=10**9):
            for _ in range(rounds):
                for name, middleware in variants.items():
                    with override_settings(MIDDLEWARE=middleware):
                        # A new client builds its middleware chain from the setting.
                        client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
                        client.get("/v1/projects")
                        samples[name].append(requests / self._time(client, requests))
            take_ms = self._per_call_ms(
                lambda: services.rate_limit_take(bucket="bench", rate_per_s=1e9, burst=10**9),
                requests,
            )
        audited = AuditRecord.objects.filter(api_key=key).count()
        AuditRecord.objects.filter(api_key=key).delete()
        ApiKey.objects.filter(pk=key.pk).delete()

        base = statistics.median(samples["full stack"])
        self.stdout.write(f"\nbench api: GET /v1/projects, {rounds} rounds x {requests} requests")
        self.stdout.write(f"{'variant':<22}{'req/s (median)':>16}{'ms/request':>12}{'vs full':>9}")
        for name, values in samples.items():
            rate = statistics.median(values)
            self.stdout.write(f"{name:<22}{rate:>16.0f}{1000 / rate:>12.2f}{rate / base:>8.2f}x")
        self.stdout.write(f"rate-limit check (one UPSERT): {take_ms:.3f} ms per request")
        self.stdout.write(f"audit rows written by the full-stack rounds: {audited}")

    @staticmethod
    def _time(client: Client, requests: int) -> float:
        started = time.perf_counter()
        for _ in range(requests):
            response = client.get("/v1/projects")
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.content
        return elapsed

    @staticmethod
    def _per_call_ms(call: Callable[[], Any], repeat: int) -> float:
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        return (time.perf_counter() - started) * 1000 / repeat
