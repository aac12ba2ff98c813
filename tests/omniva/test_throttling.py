"""The per-key leaky bucket: over the rate, 429 RATE_LIMITED with Retry-After."""

from __future__ import annotations

import time

import pytest

from omniva import services
from omniva.models import Scope
from omniva.rate_limits import Allowances
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db


def test_key_over_its_burst_gets_429_with_retry_after(client, make_key, settings) -> None:
    settings.OMNIVA_RATE_LIMIT = 0.1  # one request per 10 s
    settings.OMNIVA_RATE_BURST = 3
    handle = make_key(Scope.CONTENT)

    statuses = [client.get("/v1/projects", **handle.headers).status_code for _ in range(3)]
    refused = client.get("/v1/projects", **handle.headers)

    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    body = refused.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "RATE_LIMITED"
    assert 1 <= int(refused["Retry-After"]) <= 10


def test_each_key_has_its_own_bucket(client, make_key, settings) -> None:
    settings.OMNIVA_RATE_LIMIT = 0.1
    settings.OMNIVA_RATE_BURST = 1
    first = make_key(Scope.CONTENT)
    second = make_key(Scope.CONTENT)

    assert client.get("/v1/projects", **first.headers).status_code == 200
    assert client.get("/v1/projects", **first.headers).status_code == 429
    assert client.get("/v1/projects", **second.headers).status_code == 200


def test_bucket_leaks_so_a_caller_may_go_again() -> None:
    # 1000/s with a burst of 1: a second call right away is told to wait a millisecond
    # or so, and once the bucket leaked the caller may go again. Refusals do not spend,
    # so asking until it is allowed is a fair wait (no fixed sleep: a loaded machine
    # may take longer than the millisecond between two statements).
    assert services.rate_limit_take(bucket="t", rate_per_s=1000, burst=1) is None
    wait = services.rate_limit_take(bucket="t", rate_per_s=1000, burst=1)
    assert wait is None or wait <= 0.002
    wait_for(
        lambda: services.rate_limit_take(bucket="t", rate_per_s=1000, burst=1) is None,
        timeout=5,
        interval=0.001,
        what="the bucket to leak",
    )


def test_refused_requests_do_not_spend_the_allowance() -> None:
    assert services.rate_limit_take(bucket="s", rate_per_s=0.01, burst=1) is None
    first_wait = services.rate_limit_take(bucket="s", rate_per_s=0.01, burst=1)
    second_wait = services.rate_limit_take(bucket="s", rate_per_s=0.01, burst=1)

    assert first_wait is not None
    assert second_wait is not None
    assert second_wait <= first_wait  # refusals did not push the next slot further out


def test_a_process_charges_the_shared_bucket_in_chunks_and_two_never_pass_the_rate_together(
    django_assert_max_num_queries,
) -> None:
    # Two processes' allowances on one bucket: 2000/s, burst 100, so chunks of 50.
    first, second = Allowances(), Allowances()
    started = time.monotonic()
    with django_assert_max_num_queries(4):
        allowed = sum(first.take("chunked", rate_per_s=2000, burst=100) is None for _ in range(100))
    for _ in range(300):
        for allowance in (first, second):
            allowed += allowance.take("chunked", rate_per_s=2000, burst=100) is None
    elapsed = time.monotonic() - started

    assert allowed >= 100
    # Everything let through was charged to the shared bucket first.
    assert allowed <= 100 + 2000 * elapsed + 1
