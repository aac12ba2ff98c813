"""The Engines endpoints of API.md (seed 000), on the real database."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from engines import services
from engines.models import EngineInstance, Event, EventStatus, EventType
from omniva.errors import ErrorCode, OmnivaError
from omniva.notifications import RECHECK_S
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db


def post(api: Any, path: str, body: Any = None) -> Any:
    return api.post(path, body if body is not None else {}, content_type="application/json")


def put(api: Any, path: str, body: Any) -> Any:
    return api.put(path, body, content_type="application/json")


def make_events(event_type: EventType, priorities: list[int]) -> list[Event]:
    return [
        services.event_create(event_type=event_type, priority=p, data={"n": i})
        for i, p in enumerate(priorities)
    ]


def claim(api: Any, batch_size: int = 3, **extra: Any) -> Any:
    return post(
        api, "/v1/events/claim", {"engine_type": "actor", "batch_size": batch_size, **extra}
    )


# --- registration and heartbeats -------------------------------------------------------------


def test_registration_answers_201_in_the_seeds_shape(api: Any) -> None:
    body = {
        "engine_type": "actor",
        "capabilities": ["dialogue_generation"],
        "resource_limits": {"max_concurrent_events": 5, "memory_limit_mb": 1024},
    }
    response = post(api, "/v1/engine-instances", body)
    assert response.status_code == 201
    engine = response.json()["data"]
    assert engine["engine_type"] == "actor"
    assert engine["status"] == "active"
    assert engine["current_workload"] == 0
    assert engine["metadata"] == {
        "static_config": {
            "capabilities": ["dialogue_generation"],
            "resource_limits": {"max_concurrent_events": 5, "memory_limit_mb": 1024},
        },
        "dynamic_state": {"resource_utilization": {}},
    }
    assert EngineInstance.objects.filter(pk=engine["id"]).exists()


def test_a_name_an_online_engine_holds_is_refused_with_409(api: Any) -> None:
    assert (
        post(api, "/v1/engine-instances", {"engine_type": "actor", "name": "a"}).status_code == 201
    )
    again = post(api, "/v1/engine-instances", {"engine_type": "actor", "name": "a"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "ENGINE_ALREADY_REGISTERED"
    assert EngineInstance.objects.count() == 1


def test_an_offline_engines_name_can_be_registered_again(api: Any, event_type: EventType) -> None:
    old = services.engine_register(engine_type="actor", name="a")
    make_events(event_type, [5])
    services.events_claim(engine_type="actor", engine_id=old.pk)
    EngineInstance.objects.filter(pk=old.pk).update(
        last_heartbeat=timezone.now() - timedelta(hours=1)
    )
    response = post(api, "/v1/engine-instances", {"engine_type": "actor", "name": "a"})
    assert response.status_code == 201
    assert not EngineInstance.objects.filter(pk=old.pk).exists()
    assert Event.objects.get().status == EventStatus.PENDING  # its lease went back


@pytest.mark.parametrize(
    "limits",
    [{"max_concurrent_events": 0}, {"max_concurrent_events": "many"}, {"memory_limit_mb": -1}],
)
def test_bad_resource_limits_are_refused_with_400(api: Any, limits: dict) -> None:
    body = {"engine_type": "actor", "resource_limits": limits}
    response = post(api, "/v1/engine-instances", body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert not EngineInstance.objects.exists()


def test_heartbeat_of_an_unknown_engine_is_404(api: Any) -> None:
    for engine_id in ["6f1c1b8e-5b7a-4c39-9d8e-1f2a3b4c5d6e", "not-a-uuid"]:
        response = put(api, f"/v1/engine-instances/{engine_id}/heartbeat", {"status": "idle"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "ENGINE_NOT_FOUND"


def test_heartbeat_records_state_and_extends_the_leases_the_engine_holds(
    api: Any, engine: EngineInstance, event_type: EventType
) -> None:
    make_events(event_type, [5])
    [claimed] = services.events_claim(engine_type="actor", engine_id=engine.pk)
    soon = timezone.now() + timedelta(seconds=5)
    Event.objects.filter(pk=claimed.pk).update(lock_until=soon)
    body = {
        "status": "processing",
        "current_workload": 1,
        "resource_utilization": {"cpu_percent": 45.2},
    }
    response = put(api, f"/v1/engine-instances/{engine.pk}/heartbeat", body)
    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["status"], data["current_workload"]) == ("processing", 1)
    assert data["metadata"]["dynamic_state"]["resource_utilization"] == {"cpu_percent": 45.2}
    assert Event.objects.get(pk=claimed.pk).lock_until > soon + timedelta(seconds=200)


def test_an_engine_without_heartbeats_is_offline_when_read(
    api: Any, engine: EngineInstance
) -> None:
    with override_settings(OMNIVA_ENGINE_OFFLINE_AFTER_S=60):
        EngineInstance.objects.filter(pk=engine.pk).update(
            last_heartbeat=timezone.now() - timedelta(seconds=61)
        )
        assert api.get(f"/v1/engine-instances/{engine.pk}").json()["data"]["status"] == "offline"
        listed = api.get("/v1/engine-instances?status=offline").json()["data"]
        assert [e["id"] for e in listed] == [str(engine.pk)]
        assert api.get("/v1/engine-instances?status=active").json()["data"] == []


def test_deregistering_puts_the_engines_leased_events_back(
    api: Any, engine: EngineInstance, event_type: EventType
) -> None:
    make_events(event_type, [5, 5])
    services.events_claim(engine_type="actor", engine_id=engine.pk)
    response = api.delete(f"/v1/engine-instances/{engine.pk}")
    assert response.status_code == 200
    assert response.json()["data"]["released_events"] == 2
    assert not EngineInstance.objects.exists()
    events = list(Event.objects.all())
    assert {e.status for e in events} == {EventStatus.PENDING}
    assert {e.retry_count for e in events} == {0}  # not a failed attempt
    assert len(claim(api).json()["data"]) == 2


# --- claims -----------------------------------------------------------------------------------


def test_claims_come_highest_priority_first_then_oldest(api: Any, event_type: EventType) -> None:
    events = make_events(event_type, [1, 9, 5, 9])
    data = claim(api, batch_size=10).json()["data"]
    assert [e["id"] for e in data] == [events[1].pk, events[3].pk, events[2].pk, events[0].pk]
    first = data[0]
    assert set(first) >= {
        "id",
        "event_type_id",
        "event_type",
        "priority",
        "data",
        "lock_until",
        "retry_count",
        "lease_token",
    }
    assert first["event_type"] == "render"
    assert first["retry_count"] == 0


@pytest.mark.parametrize(("batch_size", "status", "count"), [(1, 200, 1), (10, 200, 10)])
def test_batch_size_takes_at_most_that_many(
    api: Any, event_type: EventType, batch_size: int, status: int, count: int
) -> None:
    make_events(event_type, [5] * 12)
    response = claim(api, batch_size=batch_size)
    assert response.status_code == status
    assert len(response.json()["data"]) == count


def test_the_default_batch_is_three_in_both_claim_forms(api: Any, event_type: EventType) -> None:
    make_events(event_type, [5] * 7)
    assert len(post(api, "/v1/events/claim", {"engine_type": "actor"}).json()["data"]) == 3
    assert len(api.get("/v1/events/queue/actor").json()["data"]) == 3
    assert len(api.get("/v1/events/queue/actor?batch_size=1").json()["data"]) == 1


@pytest.mark.parametrize("batch_size", [0, 11, -1, "x"])
def test_a_batch_size_outside_1_to_10_is_refused_in_both_forms(
    api: Any, event_type: EventType, batch_size: Any
) -> None:
    make_events(event_type, [5])
    assert claim(api, batch_size=batch_size).status_code == 400
    response = api.get(f"/v1/events/queue/actor?batch_size={batch_size}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert Event.objects.get().status == EventStatus.PENDING


def test_an_engine_takes_no_more_than_its_max_concurrent_events(
    api: Any, event_type: EventType
) -> None:
    engine = services.engine_register(
        engine_type="actor", name="small", resource_limits={"max_concurrent_events": 2}
    )
    make_events(event_type, [5] * 5)
    first = claim(api, batch_size=10, engine_id=str(engine.pk)).json()["data"]
    second = claim(api, batch_size=10, engine_id=str(engine.pk)).json()["data"]
    assert (len(first), len(second)) == (2, 0)


@pytest.mark.django_db(transaction=True)
def test_concurrent_claimers_never_get_the_same_event() -> None:
    event_type = services.event_type_create(name="render", engine_type="actor")
    Event.objects.bulk_create(
        [
            Event(event_type=event_type, engine_type="actor", data={"n": i}, priority=i % 3)
            for i in range(300)
        ]
    )
    claimed: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def claimer() -> None:
        try:
            barrier.wait()
            while True:
                events = services.events_claim(engine_type="actor", batch_size=7)
                if not events:
                    return
                with lock:
                    claimed.extend(e.pk for e in events)
        finally:
            connection.close()

    threads = [threading.Thread(target=claimer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 300
    assert len(set(claimed)) == 300


# --- status reports, retries, dead letter ---------------------------------------------------------


def test_completion_stores_the_result(api: Any, event_type: EventType) -> None:
    make_events(event_type, [5])
    [event] = claim(api).json()["data"]
    body = {"status": "completed", "result": {"ok": 1}, "lease_token": event["lease_token"]}
    response = put(api, f"/v1/events/{event['id']}/status", body)
    assert response.status_code == 200
    data = response.json()["data"]
    assert (data["status"], data["result"], data["progress"]) == ("completed", {"ok": 1}, 100.0)


def test_processing_extends_the_lease_and_records_progress(api: Any, event_type: EventType) -> None:
    make_events(event_type, [5])
    [event] = claim(api).json()["data"]
    Event.objects.filter(pk=event["id"]).update(lock_until=timezone.now() + timedelta(seconds=3))
    body = {"status": "processing", "progress": 40, "lease_token": event["lease_token"]}
    data = put(api, f"/v1/events/{event['id']}/status", body).json()["data"]
    assert data["progress"] == 40
    assert Event.objects.get().lock_until > timezone.now() + timedelta(seconds=200)


def test_a_stale_lease_token_is_refused_with_409_and_changes_nothing(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, [5])
    [first] = claim(api).json()["data"]
    Event.objects.update(lock_until=timezone.now() - timedelta(seconds=1))  # the lease ran out
    [second] = claim(api).json()["data"]
    assert second["id"] == first["id"]
    assert second["retry_count"] == 1  # the expired lease counted as a failed attempt
    late = {"status": "completed", "result": {"late": True}, "lease_token": first["lease_token"]}
    response = put(api, f"/v1/events/{first['id']}/status", late)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "EVENT_LEASE_LOST"
    event = Event.objects.get()
    assert (event.status, event.result, str(event.lease_token)) == (
        EventStatus.LEASED,
        None,
        second["lease_token"],
    )


def test_a_report_on_an_event_not_leased_is_refused_with_409(
    api: Any, event_type: EventType
) -> None:
    [event] = make_events(event_type, [5])
    response = put(api, f"/v1/events/{event.pk}/status", {"status": "completed"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "EVENT_LEASE_LOST"
    assert Event.objects.get().status == EventStatus.PENDING


def test_failures_retry_after_30_60_120_s_then_dead_letter(api: Any, event_type: EventType) -> None:
    make_events(event_type, [5])
    for retry, backoff in enumerate([30, 60, 120], start=1):
        [event] = claim(api).json()["data"]
        before = timezone.now()
        body = {"status": "failed", "error": "boom", "lease_token": event["lease_token"]}
        data = put(api, f"/v1/events/{event['id']}/status", body).json()["data"]
        assert (data["status"], data["retry_count"]) == ("pending", retry)
        assert data["error"] == {"code": "ENGINE_ERROR", "message": "boom"}
        stored = Event.objects.get()
        waited = (stored.available_at - before).total_seconds()
        assert backoff - 1 < waited <= backoff + 1
        assert claim(api).json()["data"] == []  # not before the backoff passed
        Event.objects.update(available_at=timezone.now())
    [event] = claim(api).json()["data"]
    body = {"status": "failed", "error": {"code": "NO_GPU"}, "lease_token": event["lease_token"]}
    data = put(api, f"/v1/events/{event['id']}/status", body).json()["data"]
    assert (data["status"], data["retry_count"]) == ("dead_lettered", 4)
    dead = api.get("/v1/events/dead-letter").json()["data"]
    assert [e["id"] for e in dead] == [event["id"]]


def test_an_expired_last_lease_dead_letters_at_the_next_claim(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, [5])
    Event.objects.update(retry_count=3)
    claim(api)
    Event.objects.update(lock_until=timezone.now() - timedelta(seconds=1))
    assert claim(api).json()["data"] == []
    event = Event.objects.get()
    assert (event.status, event.retry_count) == (EventStatus.DEAD_LETTERED, 4)
    assert event.error["code"] == "LEASE_EXPIRED"


def test_an_event_whose_last_lease_ran_out_is_requeued_though_no_claim_came_since(
    api: Any, event_type: EventType
) -> None:
    [event] = make_events(event_type, [5])
    Event.objects.update(retry_count=3)
    claim(api)
    Event.objects.update(lock_until=timezone.now() - timedelta(seconds=1))

    response = post(api, f"/v1/events/{event.pk}/requeue")

    assert response.status_code == 200
    assert (response.json()["data"]["status"], response.json()["data"]["retry_count"]) == (
        "pending",
        0,
    )


def test_an_event_whose_lease_ran_out_with_retries_left_is_not_requeued(
    api: Any, event_type: EventType
) -> None:
    [event] = make_events(event_type, [5])
    claim(api)
    Event.objects.update(lock_until=timezone.now() - timedelta(seconds=1))

    response = post(api, f"/v1/events/{event.pk}/requeue")

    assert response.status_code == 409  # the next claim takes it: a retry is left
    assert Event.objects.get().status == EventStatus.LEASED


def test_requeue_returns_a_dead_lettered_event_with_its_retries_renewed(
    api: Any, event_type: EventType
) -> None:
    [event] = make_events(event_type, [5])
    services.event_dead_letter(event_id=event.pk, reason="operator")
    response = post(api, f"/v1/events/{event.pk}/requeue")
    assert response.status_code == 200
    assert (response.json()["data"]["status"], response.json()["data"]["retry_count"]) == (
        "pending",
        0,
    )
    assert [e["id"] for e in claim(api).json()["data"]] == [event.pk]
    again = post(api, f"/v1/events/{event.pk}/requeue")
    assert again.status_code == 409  # leased now, not dead-lettered


def test_unknown_and_malformed_event_ids_are_404(api: Any) -> None:
    # "³" and "①" are digits to str.isdigit, not to int(): they answered 500.
    for event_id in ["999999", "abc", "-1", "99999999999999999999999", "³", "①"]:
        response = api.get(f"/v1/events/{event_id}")
        assert response.status_code == 404, event_id
        assert response.json()["error"]["code"] == "EVENT_NOT_FOUND"


def test_an_event_type_named_by_a_digit_int_cannot_read_is_a_validation_error(api: Any) -> None:
    response = post(api, "/v1/events", {"event_type": "³", "data": {}})
    assert response.status_code == 400
    assert response.json()["error"]["details"]["event_type"] == ["No event type '³'."]
    assert not Event.objects.exists()


def test_events_are_created_with_the_types_defaults_and_listed_with_filters(api: Any) -> None:
    created = post(
        api,
        "/v1/event-types",
        {"name": "speak", "engine_type": "actor", "default_priority": 7, "max_retries": 2},
    )
    assert created.status_code == 201
    assert post(api, "/v1/event-types", {"name": "speak", "engine_type": "x"}).status_code == 400
    response = post(api, "/v1/events", {"event_type": "speak", "data": {"line": "hi"}})
    assert response.status_code == 201
    event = response.json()["data"]
    assert (event["priority"], event["max_retries"], event["status"]) == (7, 2, "pending")
    bad = post(api, "/v1/events", {"event_type": "nope", "data": {}})
    assert bad.status_code == 400
    assert bad.json()["error"]["details"]["event_type"]
    listed = api.get("/v1/events?event_type=speak&status=pending").json()["data"]
    assert [e["id"] for e in listed] == [event["id"]]
    assert api.get("/v1/events?status=completed").json()["data"] == []
    assert api.get("/v1/events?status=bogus").status_code == 400


def test_a_key_without_the_engines_scope_is_refused(client: Any, make_key: Any) -> None:
    key = make_key("jobs:read")
    response = client.get("/v1/engine-instances", **key.headers)
    assert response.status_code == 403
    assert client.get("/v1/engine-instances").status_code == 401


# --- long polls ---------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_long_poll_wakes_when_an_event_is_created(api: Any) -> None:
    event_type = services.event_type_create(name="render", engine_type="actor")
    result: dict[str, Any] = {}

    def poll() -> None:
        try:
            started = time.monotonic()
            result["events"] = services.events_claim(engine_type="actor", wait_s=10)
            result["waited"] = time.monotonic() - started
        finally:
            connection.close()

    poller = threading.Thread(target=poll)
    poller.start()
    # The poller has read (nothing) and waits on the listener.
    wait_for(lambda: "actor" in services.listener._waiters, timeout=5, what="a waiting poll")
    created_at = time.monotonic()
    event = services.event_create(event_type=event_type, data={})
    poller.join(timeout=15)
    woke_after = time.monotonic() - created_at
    assert [e.pk for e in result["events"]] == [event.pk]
    # Woken by the NOTIFY, well before the listener's fallback recheck would have.
    assert woke_after < RECHECK_S / 2


def test_a_long_poll_with_nothing_to_claim_returns_empty_after_wait_s(
    api: Any, event_type: EventType
) -> None:
    started = time.monotonic()
    response = post(api, "/v1/events/claim", {"engine_type": "actor", "wait_s": 0.3})
    assert response.status_code == 200
    assert response.json()["data"] == []
    assert 0.3 <= time.monotonic() - started < 3


def test_deregistering_leaves_a_lease_that_ran_out_to_be_counted_by_the_next_claim(
    api: Any, engine: EngineInstance, event_type: EventType
) -> None:
    make_events(event_type, [5])
    services.events_claim(engine_type="actor", engine_id=engine.pk)
    Event.objects.update(lock_until=timezone.now() - timedelta(seconds=1))
    assert api.delete(f"/v1/engine-instances/{engine.pk}").json()["data"]["released_events"] == 0
    [again] = claim(api).json()["data"]
    assert again["retry_count"] == 1


def test_an_engine_cannot_report_itself_offline(engine: EngineInstance) -> None:
    with pytest.raises(OmnivaError) as refused:
        services.engine_heartbeat(engine_id=engine.pk, status="offline")
    assert refused.value.code == ErrorCode.VALIDATION_ERROR
    engine.refresh_from_db()
    assert engine.reported_status == "active"


def test_a_claim_for_an_engine_that_deregistered_meanwhile_is_404_and_takes_nothing(
    engine: EngineInstance, event_type: EventType
) -> None:
    make_events(event_type, [5])
    # As when the engine deregisters while its long poll waits: the engine was looked up,
    # then its row went away before the claim statement.
    EngineInstance.objects.filter(pk=engine.pk).delete()
    with pytest.raises(OmnivaError) as refused:
        services.events_claim_now(engine_type="actor", engine=engine, batch_size=3)
    assert refused.value.code == ErrorCode.ENGINE_NOT_FOUND
    assert Event.objects.get().status == EventStatus.PENDING


# --- metrics and health ---------------------------------------------------------------------


def test_metrics_count_events_by_status_and_engines_online(
    api: Any, client: Any, engine: EngineInstance, event_type: EventType
) -> None:
    make_events(event_type, [5, 5, 5])
    services.events_claim(engine_type="actor", engine_id=engine.pk, batch_size=1)
    offline = services.engine_register(engine_type="actor", name="gone")
    EngineInstance.objects.filter(pk=offline.pk).update(
        last_heartbeat=timezone.now() - timedelta(hours=1)
    )
    data = api.get("/v1/metrics").json()["data"]
    assert data["events"]["pending"] == 2
    assert data["events"]["leased"] == 1
    assert data["engines_online"] == 1
    text = client.get("/metrics").content.decode()
    assert 'omniva_events{engine_type="actor",status="pending"} 2.0' in text
    assert 'omniva_engines{engine_type="actor",status="offline"} 1.0' in text
    assert 'omniva_engines{engine_type="actor",status="active"} 1.0' in text


def test_health_is_degraded_while_events_wait_for_an_engine_type_with_no_engine_online(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, [5])
    check = api.get("/v1/health").json()["data"]["checks"]["engines"]
    assert check["status"] == "degraded"
    assert check["unserved_engine_types"] == ["actor"]
    services.engine_register(engine_type="actor", name="here")
    assert api.get("/v1/health").json()["data"]["checks"]["engines"]["status"] == "ok"
