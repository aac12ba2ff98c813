"""Engines and events write their activity rows in the transaction of each change."""

from __future__ import annotations

import pytest

from engines import services
from engines.models import EngineInstance, EventType
from omniva.models import Activity

pytestmark = pytest.mark.django_db


def stream(kind: str) -> list[dict]:
    return [row.data for row in Activity.objects.filter(kind=kind).order_by("id")]


def test_an_events_life_is_in_the_stream(engine: EngineInstance, event_type: EventType) -> None:
    event = services.event_create(event_type=event_type, data={})
    services.events_claim(engine_type="actor", engine_id=engine.pk)
    report = {"event_id": event.pk, "engine_id": engine.pk}  # the engine that holds it
    services.event_update_status(**report, status="processing", progress=50)
    services.event_update_status(**report, status="completed", result={"ok": 1})
    assert [(e["id"], e["status"]) for e in stream("event:update")] == [
        (event.pk, "pending"),
        (event.pk, "leased"),
        (event.pk, "leased"),
        (event.pk, "completed"),
    ]
    assert stream("event:update")[1]["engine_id"] == str(engine.pk)
    assert stream("event:update")[2]["progress"] == 50


def test_the_claim_statement_writes_the_same_shape_as_the_other_changes(
    engine: EngineInstance, event_type: EventType
) -> None:
    services.event_create(event_type=event_type, data={})
    services.events_claim(engine_type="actor", engine_id=engine.pk)
    created, claimed = stream("event:update")
    assert set(created) == set(claimed)


def test_engines_registering_beating_and_leaving_are_in_the_stream(event_type: EventType) -> None:
    engine = services.engine_register(engine_type="actor", name="a-1")
    services.engine_heartbeat(engine_id=engine.pk, status="processing", current_workload=2)
    services.event_create(event_type=event_type, data={})
    services.events_claim(engine_type="actor", engine_id=engine.pk)
    services.engine_deregister(engine_id=engine.pk)
    updates = stream("engine:update")
    assert [(u["name"], u["status"]) for u in updates] == [("a-1", "active"), ("a-1", "processing")]
    assert [d["name"] for d in stream("engine:deregistered")] == ["a-1"]
    assert stream("event:update")[-1]["status"] == "pending"  # its lease went back
