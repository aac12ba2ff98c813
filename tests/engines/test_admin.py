"""The engines admin: engines with their derived status, event types, and events whose
actions (requeue, dead letter, deregister) go through the services."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client
from django.utils import timezone

from engines import services
from engines.admin import format_age, format_utilization
from engines.models import EngineInstance, Event, EventStatus, EventType
from omniva.errors import OmnivaError

pytestmark = pytest.mark.django_db

ENGINES = "/admin/engines/engineinstance/"
EVENTS = "/admin/engines/event/"
EVENT_TYPES = "/admin/engines/eventtype/"


@pytest.fixture
def staff_client(client: Client) -> Client:
    user = get_user_model().objects.create_superuser("root", password="pw-123456789")
    client.force_login(user)
    return client


def claimed(event_type: EventType, engine: EngineInstance, **kwargs: object) -> Event:
    """A new event, leased by `engine`."""
    event = services.event_create(event_type=event_type, data={}, **kwargs)
    [leased] = services.events_claim(engine_type="actor", engine_id=engine.pk, batch_size=1)
    assert leased.pk == event.pk
    event.refresh_from_db()
    return event


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


def act(client: Client, url: str, action: str, *pks: object) -> list[tuple[str, str]]:
    """Run an admin action on the rows `pks`; the messages it left, as (level tag, text)."""
    response = client.post(url, {"action": action, "_selected_action": [str(pk) for pk in pks]})
    assert response.status_code == 302, response.content.decode()[:2000]
    return [(message.level_tag, str(message)) for message in get_messages(response.wsgi_request)]


def row_of(page: str, link_text: str) -> str:
    """The changelist row whose first column links `link_text`."""
    return page.split(f">{link_text}</a>")[1].split("</tr>")[0]


def cell(page: str, text: str) -> bool:
    """Whether a changelist cell holds exactly `text`."""
    return f">{text}</td>" in page or f">{text}</a></th>" in page


# --- formatting ----------------------------------------------------------------------------


def test_heartbeat_ages_read_in_the_largest_fitting_units() -> None:
    assert format_age(0) == "0 s ago"
    assert format_age(12) == "12 s ago"
    assert format_age(303) == "5 min 3 s ago"
    assert format_age(2 * 3600 + 5 * 60 + 9) == "2 h 5 min ago"
    assert format_age(3 * 86400 + 4 * 3600) == "3 d 4 h ago"


def test_utilization_summarizes_whatever_keys_the_engine_reported() -> None:
    assert format_utilization({"memory_usage_mb": 512.4, "cpu_percent": 45.2}) == (
        "cpu 45%, mem 512 MB"
    )
    assert format_utilization({"gpu_percent": 80, "gpu_memory_mb": 2048, "queue": "hot"}) == (
        "gpu mem 2048 MB, gpu 80%, queue hot"
    )
    assert format_utilization({}) == "-"
    assert format_utilization(None) == "-"
    long = format_utilization({f"disk_{n}_gb": n for n in range(40)})
    assert len(long) == 100
    assert long.endswith("…")


# --- engines -------------------------------------------------------------------------------


def test_engine_changelist_shows_status_heartbeat_age_workload_held_events_and_utilization(
    staff_client, engine, event_type
) -> None:
    services.engine_heartbeat(
        engine_id=engine.pk,
        status="processing",
        current_workload=7,
        resource_utilization={"cpu_percent": 45, "memory_usage_mb": 512},
    )
    claimed(event_type, engine)
    claimed(event_type, engine)
    services.event_create(event_type=event_type, data={})  # pending: held by nobody
    silent_for(engine, 12)
    services.engine_register(engine_type="speaker", name="speaker-1")

    page = staff_client.get(ENGINES).content.decode()
    row = row_of(page, "actor-1")

    for column in ("Name", "Engine type", "Status", "Last heartbeat", "Current workload"):
        assert column in page
    assert "Held events" in page
    assert "Utilization" in page
    cells = re.findall(r'<td class="field-(\w+)[^"]*">([^<]*)</td>', row)
    assert dict(cells) == {
        "engine_type": "actor",
        "status": "processing",
        "last_heartbeat_age": cells[2][1],
        "current_workload": "7",
        "held_events": "2",  # the two leased events, not the pending one
        "utilization": "cpu 45%, mem 512 MB",
    }
    assert cells[2][1] in (format_age(12), format_age(13))
    assert "By engine type" in page


def test_engine_changelist_shows_offline_for_an_engine_whose_heartbeat_is_too_old(
    staff_client, engine
) -> None:
    services.engine_heartbeat(engine_id=engine.pk, status="processing")
    silent_for(engine, settings.OMNIVA_ENGINE_OFFLINE_AFTER_S + 5)
    fresh = services.engine_register(engine_type="actor", name="actor-2")

    page = staff_client.get(ENGINES).content.decode()
    silent, alive = row_of(page, "actor-1"), row_of(page, "actor-2")

    engine.refresh_from_db()
    assert engine.reported_status == "processing"  # what it last said is not overwritten
    assert cell(silent, "offline")
    assert not cell(silent, "processing")
    age = settings.OMNIVA_ENGINE_OFFLINE_AFTER_S + 5
    assert cell(silent, format_age(age)) or cell(silent, format_age(age + 1))
    assert cell(alive, "active")
    assert fresh.status == "active"


def test_engine_changelist_filters_by_engine_type_and_searches_by_name(
    staff_client, engine
) -> None:
    services.engine_register(engine_type="speaker", name="speaker-1")

    by_type = staff_client.get(ENGINES, {"engine_type": "speaker"}).content.decode()
    by_name = staff_client.get(ENGINES, {"q": "actor"}).content.decode()

    assert [cell(by_type, "actor-1"), cell(by_type, "speaker-1")] == [False, True]
    assert [cell(by_name, "actor-1"), cell(by_name, "speaker-1")] == [True, False]


def test_engine_page_is_read_only_and_engines_cannot_be_added_or_deleted_there(
    staff_client, engine
) -> None:
    url = f"{ENGINES}{engine.pk}/change/"

    response = staff_client.get(url)
    page = response.content.decode()
    refused = staff_client.post(url, {"name": "renamed", "reported_status": "draining"})
    changelist = staff_client.get(ENGINES).content.decode()

    assert response.status_code == 200
    assert "actor-1" in page
    for field in ("name", "engine_type", "reported_status", "current_workload"):
        assert f'name="{field}"' not in page
    assert 'name="_save"' not in page
    assert refused.status_code == 403
    assert staff_client.get(f"{ENGINES}add/").status_code == 403
    assert staff_client.get(f"{ENGINES}{engine.pk}/delete/").status_code == 403
    assert 'value="delete_selected"' not in changelist
    assert 'value="deregister"' in changelist
    engine.refresh_from_db()
    assert engine.name == "actor-1"
    assert engine.reported_status == "active"


def test_deregister_action_removes_the_engine_and_returns_its_events_to_the_queue(
    staff_client, engine, event_type
) -> None:
    held = [claimed(event_type, engine), claimed(event_type, engine)]
    idle = services.engine_register(engine_type="actor", name="actor-2")

    notes = act(staff_client, ENGINES, "deregister", engine.pk, idle.pk)

    assert notes == [
        ("success", "Deregistered actor-1; 2 events went back to the queue."),
        ("success", "Deregistered actor-2; 0 events went back to the queue."),
    ]
    assert not EngineInstance.objects.exists()
    for event in held:
        event.refresh_from_db()
        assert event.status == EventStatus.PENDING
        assert event.leased_by is None
        assert event.lease_token is None


# --- event types ---------------------------------------------------------------------------


def test_event_type_changelist_lists_the_defaults_of_each_type(staff_client, event_type) -> None:
    services.event_type_create(
        name="narrate", engine_type="speaker", default_priority=8, max_retries=1, lease_s=45
    )

    page = staff_client.get(EVENT_TYPES).content.decode()

    for column in ("Name", "Engine type", "Default priority", "Max retries", "Lease s"):
        assert column in page
    row = row_of(page, "narrate")
    assert [cell(row, value) for value in ("speaker", "8", "1", "45")] == [True] * 4
    assert cell(page, "render")


# --- events --------------------------------------------------------------------------------


def test_event_changelist_shows_the_event_columns_and_every_filter(
    staff_client, engine, event_type
) -> None:
    services.event_type_create(name="narrate", engine_type="speaker")  # a type to filter by
    event = claimed(event_type, engine, priority=9)
    Event.objects.filter(pk=event.pk).update(stage_run_id=4242)

    page = staff_client.get(EVENTS).content.decode()

    for column in ("Event type", "Engine type", "Status", "Priority", "Retries", "Lock until"):
        assert column in page
    for column in ("Leased by", "Stage run id", "Created at"):
        assert column in page
    row = row_of(page, str(event.pk))
    assert cell(row, "render")
    assert cell(row, "actor")
    assert cell(row, "leased")
    assert cell(row, "9")
    assert cell(row, "0/3")
    assert cell(row, "actor-1 (actor)")
    assert cell(row, "4242")
    for filter_title in ("By status", "By engine type", "By event type"):
        assert filter_title in page


def test_a_leased_event_whose_lease_ran_out_is_shown_as_expired(
    staff_client, engine, event_type
) -> None:
    event = claimed(event_type, engine)
    Event.objects.filter(pk=event.pk).update(lock_until=timezone.now() - timedelta(seconds=1))

    page = staff_client.get(EVENTS).content.decode()

    assert cell(page, "leased (lease expired)")


def test_event_changelist_filters_by_status_engine_type_and_event_type(
    staff_client, engine, event_type
) -> None:
    narrate = services.event_type_create(name="narrate", engine_type="speaker")
    leased = claimed(event_type, engine)
    dead = dead_lettered(event_type, engine)
    spoken = services.event_create(event_type=narrate, data={})

    def listed(query: dict[str, object]) -> list[bool]:
        page = staff_client.get(EVENTS, query).content.decode()
        return [f">{e.pk}</a>" in page for e in (leased, dead, spoken)]

    assert listed({"status__exact": "dead_lettered"}) == [False, True, False]
    assert listed({"engine_type": "speaker"}) == [False, False, True]
    assert listed({"event_type__id__exact": event_type.pk}) == [True, True, False]


def test_search_by_event_id_finds_exactly_that_event_and_other_terms_find_nothing(
    staff_client, event_type
) -> None:
    wanted = services.event_create(event_type=event_type, data={})
    other = services.event_create(event_type=event_type, data={})

    exact = staff_client.get(EVENTS, {"q": f" {wanted.pk} "}).content.decode()
    garbage = staff_client.get(EVENTS, {"q": "1 OR 1=1"})

    assert [f">{e.pk}</a>" in exact for e in (wanted, other)] == [True, False]
    assert garbage.status_code == 200
    assert [f">{e.pk}</a>" in garbage.content.decode() for e in (wanted, other)] == [False, False]


def test_event_status_and_lease_fields_are_read_only(staff_client, engine, event_type) -> None:
    event = claimed(event_type, engine)
    url = f"{EVENTS}{event.pk}/change/"

    response = staff_client.get(url)
    page = response.content.decode()
    refused = staff_client.post(url, {"status": "completed", "lock_until": "", "priority": "1"})

    assert response.status_code == 200
    assert str(event.lease_token) in page  # shown, not editable

    for field in ("status", "retry_count", "lock_until", "lease_token", "leased_by", "priority"):
        assert f'name="{field}"' not in page
    assert 'name="_save"' not in page
    assert refused.status_code == 403
    assert staff_client.get(f"{EVENTS}add/").status_code == 403
    assert staff_client.get(f"{EVENTS}{event.pk}/delete/").status_code == 403
    before = (event.status, event.lease_token, event.lock_until, event.priority)
    event.refresh_from_db()
    assert (event.status, event.lease_token, event.lock_until, event.priority) == before


def test_requeue_action_returns_dead_lettered_events_to_the_queue(
    staff_client, engine, event_type
) -> None:
    failed = dead_lettered(event_type, engine)
    moved = services.event_create(event_type=event_type, data={})
    services.event_dead_letter(event_id=moved.pk, reason="stuck")

    notes = act(staff_client, EVENTS, "requeue", failed.pk, moved.pk)

    assert notes == [
        ("success", f"Event {failed.pk} requeued."),
        ("success", f"Event {moved.pk} requeued."),
    ]
    for event in (failed, moved):
        event.refresh_from_db()
        assert event.status == EventStatus.PENDING
        assert event.retry_count == 0
        assert event.finished_at is None
        assert event.leased_by is None
    claimed_again = services.events_claim(engine_type="actor", engine_id=engine.pk, batch_size=5)
    assert sorted(e.pk for e in claimed_again) == sorted([failed.pk, moved.pk])


def test_requeue_action_reports_each_event_it_refuses_and_leaves_it_alone(
    staff_client, engine, event_type
) -> None:
    dead = dead_lettered(event_type, engine)
    pending = services.event_create(event_type=event_type, data={})

    notes = act(staff_client, EVENTS, "requeue", dead.pk, pending.pk)

    assert notes == [
        ("success", f"Event {dead.pk} requeued."),
        (
            "error",
            f"Event {pending.pk}: CONFLICT: Event {pending.pk} is pending; "
            "only dead-lettered events are requeued.",
        ),
    ]
    pending.refresh_from_db()
    assert pending.status == EventStatus.PENDING
    dead.refresh_from_db()
    assert dead.status == EventStatus.PENDING


def test_dead_letter_action_moves_pending_and_leased_events_and_refuses_finished_ones(
    staff_client, engine, event_type
) -> None:
    leased = claimed(event_type, engine)
    done = claimed(event_type, engine)
    services.event_update_status(
        event_id=done.pk, status="completed", result={"ok": True}, lease_token=done.lease_token
    )
    pending = services.event_create(event_type=event_type, data={})

    notes = act(staff_client, EVENTS, "dead_letter", leased.pk, done.pk, pending.pk)

    assert notes == [
        ("success", f"Event {leased.pk} moved to the dead letter queue."),
        ("success", f"Event {pending.pk} moved to the dead letter queue."),
        (
            "error",
            f"Event {done.pk}: CONFLICT: Event {done.pk} is completed; "
            "only pending or leased events move.",
        ),
    ]
    for event in (leased, pending):
        event.refresh_from_db()
        assert event.status == EventStatus.DEAD_LETTERED
        assert event.lease_token is None
        assert event.error == {
            "code": "DEAD_LETTERED",
            "message": "moved to the dead letter queue in the admin by root",
        }
    done.refresh_from_db()
    assert done.status == EventStatus.COMPLETED
    assert done.result == {"ok": True}
    # The engine that held the leased one hears that it lost it.
    with pytest.raises(OmnivaError) as lost:
        services.event_update_status(
            event_id=leased.pk, status="completed", lease_token=leased.lease_token
        )
    assert lost.value.code == "EVENT_LEASE_LOST"


def test_an_action_on_many_events_lists_ten_outcomes_of_each_kind_and_counts_the_rest(
    staff_client, event_type
) -> None:
    events = [services.event_create(event_type=event_type, data={}) for _ in range(12)]

    notes = act(staff_client, EVENTS, "requeue", *(e.pk for e in events))

    assert len(notes) == 11
    assert all(level == "error" and "CONFLICT" in text for level, text in notes[:10])
    assert notes[10] == ("error", "… and 2 more refused.")


def test_a_staff_user_who_may_only_view_events_sees_no_actions(client, event_type) -> None:
    from django.contrib.auth.models import Permission

    user = get_user_model().objects.create_user("viewer", password="pw-123456789", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_event"))
    client.force_login(user)
    event = services.event_create(event_type=event_type, data={})

    page = client.get(EVENTS).content.decode()
    response = client.post(EVENTS, {"action": "dead_letter", "_selected_action": [event.pk]})

    assert f">{event.pk}</a>" in page
    assert 'value="dead_letter"' not in page
    assert 'value="requeue"' not in page
    assert response.status_code in (200, 302)
    event.refresh_from_db()
    assert event.status == EventStatus.PENDING
