"""`manage.py engines` and `manage.py requeue`, run in-process through call_command."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from engines import services
from engines.models import EngineInstance, Event, EventStatus, EventType

pytestmark = pytest.mark.django_db


@dataclass
class Output:
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.strip().splitlines()


def run(*args: str) -> Output:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return Output(out.getvalue(), err.getvalue())


def run_failing(*args: str) -> tuple[CommandError, Output]:
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as failure:
        call_command(*args, stdout=out, stderr=err)
    return failure.value, Output(out.getvalue(), err.getvalue())


def claimed(event_type: EventType, engine: EngineInstance, **kwargs: object) -> Event:
    """A new event, leased by `engine`."""
    event = services.event_create(event_type=event_type, data={}, **kwargs)
    [leased] = services.events_claim(
        engine_type=event_type.engine_type, engine_id=engine.pk, batch_size=1
    )
    assert leased.pk == event.pk
    return leased


def dead_lettered(event_type: EventType, engine: EngineInstance) -> Event:
    """An event whose only attempt failed: the engine's report dead-letters it."""
    event = claimed(event_type, engine, max_retries=0)
    services.event_update_status(
        event_id=event.pk, status="failed", error="boom", lease_token=event.lease_token
    )
    event.refresh_from_db()
    assert event.status == EventStatus.DEAD_LETTERED
    return event


def silent_for(engine: EngineInstance, seconds: int) -> None:
    EngineInstance.objects.filter(pk=engine.pk).update(
        last_heartbeat=timezone.now() - timedelta(seconds=seconds)
    )


def table(lines: list[str]) -> list[list[str]]:
    """Rows of a table whose cells are two spaces apart (a cell may hold one space)."""
    return [[cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines]


@pytest.fixture
def fleet(engine: EngineInstance, event_type: EventType) -> dict[str, object]:
    """actor-1 processing with two leased events, actor-2 silent (offline), speaker-1
    idle; events of both types in every state but completed."""
    narrate = services.event_type_create(name="narrate", engine_type="speaker")
    speaker = services.engine_register(engine_type="speaker", name="speaker-1")
    silent = services.engine_register(engine_type="actor", name="actor-2")
    claimed(event_type, engine)
    claimed(event_type, engine)
    dead_lettered(event_type, engine)
    services.event_create(event_type=event_type, data={})
    services.event_create(event_type=narrate, data={})
    services.engine_heartbeat(engine_id=engine.pk, status="processing", current_workload=2)
    services.engine_heartbeat(engine_id=speaker.pk, status="idle")
    services.engine_heartbeat(engine_id=silent.pk, status="processing", current_workload=1)
    silent_for(silent, settings.OMNIVA_ENGINE_OFFLINE_AFTER_S + 30)
    return {"engine": engine, "silent": silent, "speaker": speaker}


# --- engines -------------------------------------------------------------------------------


def test_engines_prints_each_engine_with_its_derived_status_and_then_the_event_counts(
    fleet,
) -> None:
    output = run("engines")

    engines_part, _, events_part = output.out.partition("\n\n")
    header, *rows = table(engines_part.splitlines())
    assert header == ["NAME", "TYPE", "STATUS", "HEARTBEAT", "WORKLOAD", "HELD"]
    by_name = {row[0]: row for row in rows}
    assert list(by_name) == ["actor-1", "actor-2", "speaker-1"]
    assert by_name["actor-1"][1:3] == ["actor", "processing"]
    assert by_name["actor-1"][4:] == ["2", "2"]
    assert by_name["actor-1"][3].endswith(" s ago")
    # No heartbeat for longer than the limit: offline, whatever it last reported.
    assert by_name["actor-2"][1:3] == ["actor", "offline"]
    assert by_name["actor-2"][3].endswith(" s ago")
    assert " min " in by_name["actor-2"][3]
    assert by_name["actor-2"][4:] == ["1", "0"]
    assert by_name["speaker-1"][1:] == ["speaker", "idle", by_name["speaker-1"][3], "0", "0"]

    title, *summary = events_part.strip().splitlines()
    assert title == "Events by engine type and status:"
    assert table(summary) == [
        ["TYPE", "PENDING", "LEASED", "COMPLETED", "DEAD_LETTERED", "TOTAL"],
        ["actor", "1", "2", "0", "1", "4"],
        ["speaker", "1", "0", "0", "0", "1"],
    ]


def test_engines_filters_by_type_and_by_derived_status(fleet) -> None:
    speakers = run("engines", "--type", "speaker")
    offline = run("engines", "--status", "offline")
    processing = run("engines", "--status", "processing")

    def names(output: Output) -> list[str]:
        engines_part = output.out.partition("\n\n")[0]
        return [row[0] for row in table(engines_part.splitlines())[1:]]

    assert names(speakers) == ["speaker-1"]
    assert "actor  " not in speakers.out.partition("\n\n")[2]  # the events of speakers only
    assert names(offline) == ["actor-2"]
    # actor-2 last reported processing, but it is offline now.
    assert names(processing) == ["actor-1"]


def test_engines_says_so_when_there_are_no_engines_and_no_events(db) -> None:
    assert run("engines").lines == ["No engines.", "", "No events."]


def test_engines_json_prints_the_engines_and_the_event_counts_as_json(fleet) -> None:
    printed = json.loads(run("engines", "--json").out)

    engines = {engine["name"]: engine for engine in printed["engines"]}
    assert list(engines) == ["actor-1", "actor-2", "speaker-1"]
    actor = engines["actor-1"]
    assert actor["id"] == str(fleet["engine"].pk)
    assert actor["engine_type"] == "actor"
    assert actor["status"] == "processing"
    assert actor["current_workload"] == 2
    assert actor["held_events"] == 2
    assert 0 <= actor["heartbeat_age_s"] < 5
    assert engines["actor-2"]["status"] == "offline"
    assert engines["actor-2"]["reported_status"] == "processing"
    assert engines["actor-2"]["heartbeat_age_s"] >= settings.OMNIVA_ENGINE_OFFLINE_AFTER_S + 30
    assert printed["events"] == {
        "actor": {"pending": 1, "leased": 2, "completed": 0, "dead_lettered": 1},
        "speaker": {"pending": 1, "leased": 0, "completed": 0, "dead_lettered": 0},
    }


def test_engines_refuses_an_unknown_status(db) -> None:
    with pytest.raises(CommandError, match="invalid choice"):
        run("engines", "--status", "sleeping")


# --- requeue -------------------------------------------------------------------------------


def test_requeue_returns_dead_lettered_events_to_the_queue_with_their_retries_renewed(
    engine, event_type
) -> None:
    failed = dead_lettered(event_type, engine)
    moved = services.event_create(event_type=event_type, data={})
    services.event_dead_letter(event_id=moved.pk, reason="stuck")

    output = run("requeue", str(failed.pk), str(moved.pk))

    assert output.lines == [
        f"Requeued event {failed.pk} (render).",
        f"Requeued event {moved.pk} (render).",
    ]
    assert output.err == ""
    for event in (failed, moved):
        event.refresh_from_db()
        assert event.status == EventStatus.PENDING
        assert event.retry_count == 0
    again = services.events_claim(engine_type="actor", engine_id=engine.pk, batch_size=5)
    assert sorted(event.pk for event in again) == sorted([failed.pk, moved.pk])


def test_requeue_of_an_unknown_event_exits_non_zero_with_event_not_found(db) -> None:
    failure, output = run_failing("requeue", "999999")

    assert failure.returncode == 1
    assert str(failure) == "Not requeued: 999999 (EVENT_NOT_FOUND)."
    assert output.err.strip() == "Event 999999 not requeued: EVENT_NOT_FOUND: No event 999999."
    assert output.out == ""


def test_requeue_of_an_id_that_is_no_number_is_not_found_either(db) -> None:
    failure, output = run_failing("requeue", "abc")

    assert "abc (EVENT_NOT_FOUND)" in str(failure)
    assert "EVENT_NOT_FOUND: No event abc." in output.err


def test_requeue_of_an_event_that_is_not_dead_lettered_exits_non_zero_with_conflict(
    event_type,
) -> None:
    pending = services.event_create(event_type=event_type, data={})

    failure, output = run_failing("requeue", str(pending.pk))

    assert failure.returncode == 1
    assert str(failure) == f"Not requeued: {pending.pk} (CONFLICT)."
    assert output.err.strip() == (
        f"Event {pending.pk} not requeued: CONFLICT: Event {pending.pk} is pending; "
        "only dead-lettered events are requeued."
    )
    pending.refresh_from_db()
    assert pending.status == EventStatus.PENDING


def test_requeue_requeues_the_events_it_can_and_still_fails_for_the_others(
    engine, event_type
) -> None:
    dead = dead_lettered(event_type, engine)
    pending = services.event_create(event_type=event_type, data={})

    failure, output = run_failing("requeue", "424242", str(dead.pk), str(pending.pk), str(dead.pk))

    assert str(failure) == f"Not requeued: 424242 (EVENT_NOT_FOUND), {pending.pk} (CONFLICT)."
    assert output.lines == [f"Requeued event {dead.pk} (render)."]  # once, though named twice
    assert len(output.err.strip().splitlines()) == 2
    dead.refresh_from_db()
    assert dead.status == EventStatus.PENDING


def test_requeue_needs_at_least_one_event_id(db) -> None:
    with pytest.raises(CommandError, match="the following arguments are required"):
        run("requeue")
