"""Batched reports (`PUT /v1/events/status`, issue 18): one request reports on several
leased events, each item fenced and applied like the single report, answered in order."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from engines import services
from engines.models import Event, EventStatus, EventType
from omniva.models import AuditRecord

pytestmark = pytest.mark.django_db

BATCH = "/v1/events/status"


def put(api: Any, path: str, body: Any, **extra: Any) -> Any:
    return api.put(path, body, content_type="application/json", **extra)


def claim(api: Any, batch_size: int = 3) -> list[dict[str, Any]]:
    response = api.post(
        "/v1/events/claim",
        {"engine_type": "actor", "batch_size": batch_size},
        content_type="application/json",
    )
    assert response.status_code == 200, response.json()
    return response.json()["data"]


def make_events(event_type: EventType, count: int) -> list[Event]:
    return [services.event_create(event_type=event_type, data={"n": n}) for n in range(count)]


def report(event: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
    return {"id": event["id"], "status": status, "lease_token": event["lease_token"], **fields}


def snapshot() -> list[tuple[Any, ...]]:
    return list(
        Event.objects.order_by("pk").values_list(
            "pk", "status", "retry_count", "result", "error", "progress", "lease_token"
        )
    )


def test_all_reports_of_a_batch_are_applied_in_one_request(api: Any, event_type: EventType) -> None:
    make_events(event_type, 3)
    first, second, third = claim(api)

    response = put(
        api,
        BATCH,
        [
            report(first, "completed", result={"n": 0}),
            report(second, "processing", progress=40),
            report(third, "completed", result={"n": 2}),
        ],
    )

    assert response.status_code == 200
    answers = response.json()["data"]
    assert [(a["id"], a["ok"]) for a in answers] == [
        (first["id"], True),
        (second["id"], True),
        (third["id"], True),
    ]
    assert (answers[0]["event"]["status"], answers[0]["event"]["result"]) == (
        "completed",
        {"n": 0},
    )
    assert (answers[1]["event"]["status"], answers[1]["event"]["progress"]) == ("leased", 40)
    rows = {event.pk: event for event in Event.objects.all()}
    assert (rows[first["id"]].status, rows[first["id"]].result) == ("completed", {"n": 0})
    assert (rows[second["id"]].status, rows[second["id"]].progress) == ("leased", 40)
    assert (rows[third["id"]].status, rows[third["id"]].result) == ("completed", {"n": 2})


def test_a_batch_answer_renders_each_event_as_the_single_report_does(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, 2)
    batched, single = claim(api)

    in_batch = put(api, BATCH, [report(batched, "completed", result={"ok": 1})])
    alone = put(
        api,
        f"/v1/events/{single['id']}/status",
        {"status": "completed", "result": {"ok": 1}, "lease_token": single["lease_token"]},
    )

    [answer] = in_batch.json()["data"]
    assert answer["event"].keys() == alone.json()["data"].keys()


def test_stale_token_in_one_batch_item_refuses_that_item_only(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, 3)
    first, stale, third = claim(api)
    # The middle event's lease runs out and another claim takes it with a new token.
    Event.objects.filter(pk=stale["id"]).update(lock_until=timezone.now() - timedelta(seconds=1))
    [retaken] = claim(api)
    assert retaken["id"] == stale["id"]
    before = Event.objects.filter(pk=stale["id"]).values().get()

    response = put(
        api,
        BATCH,
        [
            report(first, "completed", result={"n": 0}),
            report(stale, "completed", result={"late": True}),
            report(third, "failed", error="boom"),
        ],
    )

    assert response.status_code == 200
    answers = response.json()["data"]
    assert [(a["id"], a["ok"]) for a in answers] == [
        (first["id"], True),
        (stale["id"], False),
        (third["id"], True),
    ]
    assert answers[1]["error"]["code"] == "EVENT_LEASE_LOST"
    assert answers[1]["error"]["message"]
    assert "event" not in answers[1]
    assert Event.objects.filter(pk=stale["id"]).values().get() == before
    refused = Event.objects.get(pk=stale["id"])
    assert (refused.status, refused.result, str(refused.lease_token)) == (
        EventStatus.LEASED,
        None,
        retaken["lease_token"],
    )
    assert Event.objects.get(pk=first["id"]).status == EventStatus.COMPLETED
    assert Event.objects.get(pk=third["id"]).retry_count == 1


def test_unknown_and_unleased_events_in_a_batch_are_refused_with_the_single_reports_codes(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, 1)
    [leased] = claim(api)
    [pending] = make_events(event_type, 1)

    response = put(
        api,
        BATCH,
        [
            {"id": 999_999, "status": "completed", "lease_token": str(uuid.uuid4())},
            {"id": pending.pk, "status": "completed", "lease_token": str(uuid.uuid4())},
            report(leased, "completed", result={}),
        ],
    )

    assert response.status_code == 200
    answers = response.json()["data"]
    assert [(a["id"], a["ok"], a.get("error", {}).get("code")) for a in answers] == [
        (999_999, False, "EVENT_NOT_FOUND"),
        (pending.pk, False, "EVENT_LEASE_LOST"),
        (leased["id"], True, None),
    ]
    assert Event.objects.get(pk=pending.pk).status == EventStatus.PENDING


def test_failed_batch_items_retry_after_the_backoff_and_dead_letter_after_the_last(
    api: Any, event_type: EventType
) -> None:
    retrying, exhausted = make_events(event_type, 2)
    Event.objects.filter(pk=exhausted.pk).update(retry_count=3)
    first, last = claim(api)
    before = timezone.now()

    response = put(
        api,
        BATCH,
        [
            report(first, "failed", error="boom"),
            report(last, "failed", error={"code": "NO_GPU", "message": "none left"}),
        ],
    )

    answers = response.json()["data"]
    assert [(a["event"]["status"], a["event"]["retry_count"]) for a in answers] == [
        ("pending", 1),
        ("dead_lettered", 4),
    ]
    assert answers[0]["event"]["error"] == {"code": "ENGINE_ERROR", "message": "boom"}
    assert answers[1]["event"]["error"] == {"code": "NO_GPU", "message": "none left"}
    waited = (Event.objects.get(pk=retrying.pk).available_at - before).total_seconds()
    assert 29 < waited <= 31
    dead = api.get("/v1/events/dead-letter").json()["data"]
    assert [event["id"] for event in dead] == [exhausted.pk]


def test_reports_on_one_event_in_one_batch_apply_in_order(api: Any, event_type: EventType) -> None:
    make_events(event_type, 1)
    [event] = claim(api)

    response = put(
        api,
        BATCH,
        [
            report(event, "processing", progress=50),
            report(event, "completed", result={"done": True}),
            report(event, "completed", result={"again": True}),
        ],
    )

    answers = response.json()["data"]
    assert [a["ok"] for a in answers] == [True, True, False]
    assert answers[2]["error"]["code"] == "EVENT_LEASE_LOST"
    assert Event.objects.get().result == {"done": True}


def test_a_batch_over_100_reports_is_a_validation_error_and_changes_nothing(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, 1)
    [event] = claim(api)
    before = snapshot()

    response = put(api, BATCH, [report(event, "completed", result={})] * 101)

    assert response.status_code == 400
    body = response.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert "at most 100 reports" in body["error"]["message"]
    assert snapshot() == before


@pytest.mark.parametrize(
    "body",
    [[], {}, {"reports": []}, "completed", 5, None],
    ids=["empty list", "object", "wrapped list", "string", "number", "null"],
)
def test_an_empty_list_or_anything_but_a_list_is_a_validation_error(
    api: Any, event_type: EventType, body: Any
) -> None:
    response = put(api, BATCH, json.dumps(body))

    assert response.status_code == 400
    assert response.json()["status"] == "error"
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"status": "done"}, "status"),
        ({"status": None}, "status"),
        ({"lease_token": None}, "lease_token"),
        ({"lease_token": "not-a-uuid"}, "lease_token"),
        ({"id": "abc"}, "id"),
        ({"id": 0}, "id"),
        ({"id": 10**20}, "id"),
        ({"progress": 101}, "progress"),
        ({"error": 5}, "error"),
    ],
)
def test_a_malformed_item_refuses_the_whole_batch_and_changes_nothing(
    api: Any, event_type: EventType, item: dict[str, Any], field: str
) -> None:
    make_events(event_type, 2)
    good, bad = claim(api)
    before = snapshot()

    response = put(
        api, BATCH, [report(good, "completed", result={}), {**report(bad, "completed"), **item}]
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR"
    assert list(error["details"]) == ["1"]
    assert field in error["details"]["1"]
    assert snapshot() == before


@pytest.mark.parametrize("missing", ["id", "status", "lease_token"])
def test_a_batch_item_without_a_required_field_refuses_the_whole_batch(
    api: Any, event_type: EventType, missing: str
) -> None:
    make_events(event_type, 1)
    [event] = claim(api)
    item = report(event, "completed", result={})
    del item[missing]
    before = snapshot()

    response = put(api, BATCH, [item])

    assert response.status_code == 400
    assert response.json()["error"]["details"] == {"0": {missing: ["This field is required."]}}
    assert snapshot() == before


def test_malformed_json_is_malformed_request(api: Any) -> None:
    response = api.put(BATCH, "[{", content_type="application/json")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MALFORMED_REQUEST"


def test_the_batch_route_is_not_an_event_id_and_the_single_report_is_unchanged(
    api: Any, event_type: EventType
) -> None:
    make_events(event_type, 1)
    [event] = claim(api)

    read = api.get(BATCH)
    single = put(
        api,
        f"/v1/events/{event['id']}/status",
        {"status": "processing", "progress": 10, "lease_token": event["lease_token"]},
    )

    assert read.status_code == 405
    assert read.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert single.status_code == 200
    assert single.json()["data"]["progress"] == 10


def test_a_batch_is_one_audit_record_naming_every_event(api: Any, event_type: EventType) -> None:
    make_events(event_type, 2)
    first, second = claim(api)

    put(
        api,
        BATCH,
        [report(first, "completed"), report(second, "completed")],
        HTTP_X_REQUEST_ID="batch-audit",
    )

    record = AuditRecord.objects.get(request_id="batch-audit")
    assert (record.method, record.path, record.status) == ("PUT", BATCH, 200)
    assert record.entity_ids == [str(first["id"]), str(second["id"])]


def test_a_batch_needs_the_engines_scope_and_a_key_bound_to_no_project(
    client: Any, make_key: Any, event_type: EventType
) -> None:
    from omniva import services as core_services
    from omniva.models import Scope

    [event] = make_events(event_type, 1)
    body = [{"id": event.pk, "status": "completed", "lease_token": str(uuid.uuid4())}]
    project = core_services.project_create(name="p")
    jobs_key = make_key(Scope.JOBS_WRITE)
    bound_key = make_key(Scope.ENGINES, project=project)

    anonymous = put(client, BATCH, body)
    wrong_scope = put(client, BATCH, body, **jobs_key.headers)
    bound = put(client, BATCH, body, **bound_key.headers)

    assert [anonymous.status_code, wrong_scope.status_code, bound.status_code] == [401, 403, 403]
    assert Event.objects.get().status == EventStatus.PENDING


def test_the_service_answers_each_report_with_the_event_or_the_error_that_refused_it(
    event_type: EventType, engine: Any
) -> None:
    make_events(event_type, 2)
    first, second = services.events_claim(engine_type="actor", engine_id=engine.pk)

    answers = services.events_report(
        reports=[
            {"id": first.pk, "status": "completed", "lease_token": first.lease_token},
            {"id": second.pk, "status": "completed", "lease_token": uuid.uuid4()},
        ]
    )

    assert isinstance(answers[0], Event)
    assert answers[0].status == EventStatus.COMPLETED
    assert not isinstance(answers[1], Event)
    assert answers[1].code == "EVENT_LEASE_LOST"
    assert Event.objects.get(pk=second.pk).status == EventStatus.LEASED
