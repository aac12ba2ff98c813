"""Engines killed while they hold leased events (issue 10): a real daphne and real
`manage.py run_engine` processes, ended with SIGKILL, so nothing is deregistered or
reported.

What is proved: the events a killed engine held come back to the queue once their
lease runs out, and the next claim takes them again (a failed attempt, with a new lease
token, so the dead engine's late report is refused). After the last retry they are in
the dead letter queue; a requeue puts them back and a healthy engine completes each of
them once. No event is lost, none completes twice.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest

from engines.models import EngineInstance, Event, EventStatus
from engines.sdk.client import EngineApiError, EngineClient
from omniva.models import Activity
from tests.conftest import wait_for
from tests.engines.conftest import stop_event_listener  # noqa: F401 (autouse, as in tests/engines/)
from tests.system.conftest import Engine

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

EVENTS = 3
# Short leases, so a dead engine's events come back quickly; live engines extend theirs
# with a heartbeat and a progress report every second.
LEASE_S = 3
# One retry: the second engine killed spends it, and the next claim dead-letters.
MAX_RETRIES = 1
# Each event's handler sleeps this long, reporting progress every second: the engines
# are killed a second into it, and the healthy one completes it after this.
SLEEP_S = 5


def engine_row(name: str) -> EngineInstance:
    return EngineInstance.objects.get(name=name)


def start_and_hold(start: Callable[..., Engine], name: str, ids: list[int]) -> Engine:
    """An engine of three slots that runs every event of `ids` (it leased them and its
    handlers reported progress); returns once it does."""
    engine = start("sleep", "--name", name, "--concurrency", str(EVENTS), "--wait-s", "1")
    engine_id = engine_row(name).pk

    def running_all() -> bool:
        assert engine.process.poll() is None, engine.output()
        running = Event.objects.filter(
            pk__in=ids, status=EventStatus.LEASED, leased_by_id=engine_id, progress__gt=0
        )
        return running.count() == len(ids)

    wait_for(running_all, timeout=60, interval=0.05, what=f"{name} to run every event")
    return engine


def kill(engine: Engine) -> None:
    engine.stop(signal.SIGKILL)
    engine.process.wait(timeout=10)


def completions(event_id: int) -> int:
    """How many times the event became completed, from the activity outbox (one row per
    transition, written in the transaction that makes it)."""
    return Activity.objects.filter(
        kind="event:update", data__id=event_id, data__status=EventStatus.COMPLETED
    ).count()


def late_report_refused(client: EngineClient, event_id: int, token: str) -> bool:
    """A killed engine's late completion (a process that was only paused): refused."""
    try:
        client.request(
            "PUT",
            f"/events/{event_id}/status",
            {"status": "completed", "lease_token": token, "result": {"late": True}},
        )
    except EngineApiError as error:
        return (error.status, error.code) == (409, "EVENT_LEASE_LOST")
    return False


def test_events_held_by_a_killed_engine_come_back_go_to_the_dead_letter_queue_and_complete_once(
    engine_client: EngineClient,
    start_engine: Callable[..., Engine],
    fault_report: Callable[..., None],
) -> None:
    engine_client.request(
        "POST",
        "/event-types",
        {"name": "sleep", "engine_type": "sleep", "lease_s": LEASE_S, "max_retries": MAX_RETRIES},
    )
    ids = [
        engine_client.request(
            "POST", "/events", {"event_type": "sleep", "data": {"seconds": SLEEP_S}}
        )["id"]
        for _ in range(EVENTS)
    ]

    # 1. The first engine runs all three; it is killed while it holds them.
    first = start_and_hold(start_engine, "sleep-first", ids)
    first_id = engine_row("sleep-first").pk
    kill(first)
    held = {
        event.pk: event
        for event in Event.objects.filter(
            pk__in=ids, status=EventStatus.LEASED, leased_by_id=first_id
        )
    }
    leased_at_kill = len(held)

    # 2. Its leases run out; the next claim (a second engine) takes them again.
    second = start_and_hold(start_engine, "sleep-second", ids)
    second_id = engine_row("sleep-second").pk
    retaken = list(Event.objects.filter(pk__in=ids))
    redelivered = sum(
        event.leased_by_id == second_id
        and event.retry_count == 1
        and event.pk in held
        and event.lease_token != held[event.pk].lease_token
        for event in retaken
    )
    # While the second engine holds them, the first one's reports cannot land.
    late_refused = sum(
        late_report_refused(engine_client, event.pk, str(event.lease_token))
        for event in held.values()
    )
    kill(second)

    # 3. That was the last retry: once the second lease runs out, a claim (the healthy
    # engine's) moves them to the dead letter queue.
    healthy = start_engine("sleep", "--name", "sleep-healthy", "--concurrency", str(EVENTS))

    def all_dead_lettered() -> list[dict[str, Any]] | None:
        assert healthy.process.poll() is None, healthy.output()
        dead = [
            event
            for event in engine_client.request("GET", "/events/dead-letter")
            if event["id"] in ids
        ]
        return dead if len(dead) == EVENTS else None

    dead = wait_for(all_dead_lettered, timeout=60, interval=0.2, what="the dead letter queue")

    # 4. Requeued, the healthy engine completes them.
    requeued = [engine_client.request("POST", f"/events/{event_id}/requeue") for event_id in ids]

    def all_completed() -> list[Event] | None:
        assert healthy.process.poll() is None, healthy.output()
        rows = list(Event.objects.filter(pk__in=ids, status=EventStatus.COMPLETED))
        return rows if len(rows) == EVENTS else None

    completed = wait_for(all_completed, timeout=60, interval=0.2, what="the requeued events")
    healthy.stop()
    assert healthy.process.wait(timeout=30) == 0, healthy.output()

    healthy_id = completed[0].leased_by_id
    counts = {eid: completions(eid) for eid in ids}
    fault_report(
        events_queued=EVENTS,
        leased_at_kill=leased_at_kill,
        redelivered=redelivered,
        late_reports_refused=late_refused,
        dead_lettered=len(dead),
        requeued=sum(event["status"] == EventStatus.PENDING for event in requeued),
        completed=len(completed),
        events_lost=EVENTS - len(completed),
        duplicated_effects=sum(count - 1 for count in counts.values() if count > 1),
    )
    assert leased_at_kill == EVENTS
    assert redelivered == EVENTS
    assert late_refused == EVENTS
    assert all(event["retry_count"] == MAX_RETRIES + 1 for event in dead), dead
    assert all(event["error"]["code"] == "LEASE_EXPIRED" for event in dead), dead
    assert all((e["status"], e["retry_count"]) == ("pending", 0) for e in requeued), requeued
    assert all(event.result == {"slept_s": SLEEP_S} for event in completed)
    assert healthy_id not in (first_id, second_id)
    assert all(event.leased_by_id == healthy_id for event in completed)
    assert counts == dict.fromkeys(ids, 1), "each event completed once"
