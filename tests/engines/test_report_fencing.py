"""Reports without a lease token are fenced too (issue 19, item 5): an engine whose lease
ran out, and whose event another engine has claimed since, cannot complete or fail it by
leaving the token out. The batch requires the token; seed 000's single report
(`PUT /v1/events/{id}/status`, whose clients send no token) is fenced by what the request
carries: the engine id it names, or else the key that made the claim."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from engines import services
from engines.models import Event, EventStatus, EventType
from omniva.models import Scope
from tests.conftest import KeyHandle

pytestmark = pytest.mark.django_db


def put(client: Any, path: str, body: Any, key: KeyHandle) -> Any:
    return client.put(path, body, content_type="application/json", **key.headers)


def register(client: Any, name: str, key: KeyHandle) -> str:
    response = client.post(
        "/v1/engine-instances",
        {"engine_type": "actor", "name": name},
        content_type="application/json",
        **key.headers,
    )
    assert response.status_code == 201
    return response.json()["data"]["id"]


def claim(client: Any, key: KeyHandle, engine_id: str | None = None) -> dict[str, Any]:
    """One event, claimed by `engine_id` (POST /v1/events/claim)."""
    body: dict[str, Any] = {"engine_type": "actor", "batch_size": 1}
    if engine_id:
        body["engine_id"] = engine_id
    response = client.post("/v1/events/claim", body, content_type="application/json", **key.headers)
    [event] = response.json()["data"]
    return event


def seed_claim(client: Any, key: KeyHandle) -> dict[str, Any]:
    """One event, claimed as seed 000's client does: `GET /events/queue/{type}?batch_size=`."""
    response = client.get("/v1/events/queue/actor", {"batch_size": 1}, **key.headers)
    [event] = response.json()["data"]
    return event


def lease_runs_out(event_id: int) -> None:
    Event.objects.filter(pk=event_id).update(lock_until=timezone.now() - timedelta(seconds=1))


@pytest.fixture
def key(make_key: Any) -> KeyHandle:
    return make_key(Scope.ENGINES, name="engines")


@pytest.fixture
def event(event_type: EventType) -> Event:
    return services.event_create(event_type=event_type, data={"n": 1})


def assert_held_by_b_untouched(event: Event, b_token: str) -> None:
    event.refresh_from_db()
    assert (event.status, event.result, str(event.lease_token)) == (
        EventStatus.LEASED,
        None,
        b_token,
    )


@pytest.mark.parametrize(
    "late_report",
    [
        {"status": "completed", "result": {"by": "a"}},
        {"status": "failed", "error": "a gave up"},
    ],
    ids=["completed", "failed"],
)
@pytest.mark.parametrize("names_itself", [True, False], ids=["with-engine-id", "bare"])
def test_an_engine_whose_lease_ran_out_cannot_report_without_its_token_on_an_event_another_holds(
    client: Any, key: KeyHandle, event: Event, late_report: dict[str, Any], names_itself: bool
) -> None:
    a, b = register(client, "a", key), register(client, "b", key)
    claim(client, key, a)
    lease_runs_out(event.pk)
    held_by_b = claim(client, key, b)  # the next claim retakes it

    body = {**late_report, "engine_id": a} if names_itself else late_report
    refused = put(client, f"/v1/events/{event.pk}/status", body, key)

    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "EVENT_LEASE_LOST"
    assert_held_by_b_untouched(event, held_by_b["lease_token"])
    rightful = put(
        client,
        f"/v1/events/{event.pk}/status",
        {"status": "completed", "result": {"by": "b"}, "lease_token": held_by_b["lease_token"]},
        key,
    )
    assert rightful.status_code == 200, rightful.json()
    event.refresh_from_db()
    assert (event.status, event.result) == (EventStatus.COMPLETED, {"by": "b"})


def test_a_seed_clients_token_less_report_is_refused_once_another_keys_claim_holds_the_event(
    client: Any, make_key: Any, event: Event
) -> None:
    # Seed 000's clients send no token and no engine id, in the claim or the report; two
    # of them, each with its own key.
    key_a, key_b = make_key(Scope.ENGINES), make_key(Scope.ENGINES)
    seed_claim(client, key_a)
    lease_runs_out(event.pk)
    held_by_b = seed_claim(client, key_b)

    refused = put(client, f"/v1/events/{event.pk}/status", {"status": "completed"}, key_a)

    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "EVENT_LEASE_LOST"
    assert_held_by_b_untouched(event, held_by_b["lease_token"])
    rightful = put(
        client,
        f"/v1/events/{event.pk}/status",
        {"status": "completed", "result": {"by": "b"}},
        key_b,
    )
    assert rightful.status_code == 200, rightful.json()
    event.refresh_from_db()
    assert (event.status, event.result) == (EventStatus.COMPLETED, {"by": "b"})


def test_a_seed_clients_claim_and_token_less_reports_still_work_unchanged(
    client: Any, key: KeyHandle, event: Event
) -> None:
    seed_claim(client, key)

    progress = put(
        client, f"/v1/events/{event.pk}/status", {"status": "processing", "progress": 50}, key
    )
    done = put(
        client,
        f"/v1/events/{event.pk}/status",
        {"status": "completed", "result": {"response": "Hello there!", "confidence": 0.95}},
        key,
    )

    assert (progress.status_code, done.status_code) == (200, 200)
    assert done.json()["data"]["status"] == "completed"


def test_an_engine_may_report_without_its_token_by_naming_itself_while_it_holds_the_lease(
    client: Any, key: KeyHandle, event: Event
) -> None:
    a = register(client, "a", key)
    claim(client, key, a)

    done = put(
        client,
        f"/v1/events/{event.pk}/status",
        {"status": "completed", "result": {"by": "a"}, "engine_id": a},
        key,
    )

    assert done.status_code == 200, done.json()
    event.refresh_from_db()
    assert (event.status, event.result) == (EventStatus.COMPLETED, {"by": "a"})


def test_a_bare_report_on_an_event_a_named_engine_holds_is_refused_even_with_the_same_key(
    client: Any, key: KeyHandle, event: Event
) -> None:
    # The claim named its engine and got a token: its reports carry one or the other.
    a = register(client, "a", key)
    claim(client, key, a)

    refused = put(client, f"/v1/events/{event.pk}/status", {"status": "completed"}, key)

    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "EVENT_LEASE_LOST"
    assert Event.objects.get(pk=event.pk).status == EventStatus.LEASED
