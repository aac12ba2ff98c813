"""The live stream's websockets, with Channels' communicator against the real database.

The feed (omniva/live.py) reads committed rows on a connection of its own, so these
tests commit (transactional database); each runs its scenario on one event loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from jobs import services
from jobs.models import Job
from omniva import live
from omniva.asgi import application
from omniva.models import ApiKey, Project, Scope
from omniva.rate_limits import allowances
from omniva.services import api_key_create, api_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 10


@pytest.fixture(autouse=True)
def fresh_channel_layer() -> Any:
    """Each scenario runs on its own loop; the in-memory layer's queues belong to one."""
    channel_layers.backends = {}
    yield
    channel_layers.backends = {}


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def with_feed_stopped() -> None:
        try:
            await scenario()
        finally:
            await live.feed.stop()

    async_to_sync(with_feed_stopped)()


def key(*scopes: str, project: Project | None = None) -> str:
    _key, secret = api_key_create(
        name=f"ws-{len(scopes)}-{project.pk if project else 'all'}",
        scopes=list(scopes),
        project=project,
    )
    return secret


def connect(path: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, path, headers=[(b"host", b"localhost")])


submit = database_sync_to_async(
    lambda **kwargs: services.job_submit(**kwargs)[0]  # type: ignore[misc]
)
cancel = database_sync_to_async(lambda job_id: services.job_cancel(job_id=job_id))


async def receive_until(ws: WebsocketCommunicator, done: Callable[[dict], bool]) -> list[dict]:
    """The change messages up to the one `done` accepts (periodic metrics left out)."""
    received = []
    while True:
        message = await ws.receive_json_from(timeout=TIMEOUT)
        if message["type"] == "metrics":
            continue
        received.append(message)
        if done(message):
            return received


def test_a_client_gets_a_snapshot_and_cursor_then_the_deltas_in_order() -> None:
    secret = key(Scope.JOBS_READ)

    async def scenario() -> None:
        before = await submit(pipeline="noop")
        ws = connect(f"/ws/events?token={secret}")
        connected, _ = await ws.connect(timeout=TIMEOUT)
        assert connected
        snapshot = await ws.receive_json_from(timeout=TIMEOUT)
        assert snapshot["type"] == "snapshot"
        assert [job["id"] for job in snapshot["data"]["jobs"]] == [str(before.pk)]
        job = await submit(pipeline="noop")
        await cancel(job.pk)
        messages = await receive_until(
            ws, lambda m: m["type"] == "stage:update" and m["data"]["status"] == "cancelled"
        )
        mine = [m for m in messages if m["job_id"] == str(job.pk)]
        assert [(m["type"], m["data"].get("status")) for m in mine if m["type"] != "log"] == [
            ("job:update", "pending"),
            ("stage:update", "queued"),
            ("job:update", "pending"),  # cancel requested
            ("job:update", "cancelled"),
            ("stage:update", "cancelled"),
        ]
        ids = [m["id"] for m in messages]
        assert ids == sorted(ids)
        assert all(m["id"] > snapshot["cursor"] for m in messages)
        assert all(set(m) == {"type", "id", "at", "job_id", "data"} for m in messages)
        await ws.disconnect()

    run(scenario)


def test_a_client_that_resumes_after_its_cursor_gets_what_it_missed() -> None:
    secret = key(Scope.JOBS_READ)

    async def scenario() -> None:
        ws = connect(f"/ws/events?token={secret}")
        await ws.connect(timeout=TIMEOUT)
        cursor = (await ws.receive_json_from(timeout=TIMEOUT))["cursor"]
        await ws.disconnect()
        # Missed while away:
        missed = await submit(pipeline="noop")
        await cancel(missed.pk)
        again = connect(f"/ws/events?token={secret}&after={cursor}")
        connected, _ = await again.connect(timeout=TIMEOUT)
        assert connected
        replayed = await receive_until(
            again,
            lambda m: m["type"] == "stage:update" and m["data"].get("status") == "cancelled",
        )
        assert {m["job_id"] for m in replayed} == {str(missed.pk)}
        assert replayed[0]["type"] == "job:update"
        assert replayed[0]["data"]["status"] == "pending"
        await again.disconnect()

    run(scenario)


def test_a_project_bound_key_sees_only_its_projects_rows() -> None:
    mine = Project.objects.create(name="mine")
    theirs = Project.objects.create(name="theirs")
    secret = key(Scope.JOBS_READ, project=mine)

    async def scenario() -> None:
        ws = connect(f"/ws/events?token={secret}")
        await ws.connect(timeout=TIMEOUT)
        await ws.receive_json_from(timeout=TIMEOUT)
        other = await submit(pipeline="noop", project=theirs)
        own = await submit(pipeline="noop", project=mine)
        first = await ws.receive_json_from(timeout=TIMEOUT)
        assert first["job_id"] == str(own.pk)
        seen = await receive_until(ws, lambda m: m["type"] == "stage:update")
        assert str(other.pk) not in {m["job_id"] for m in seen}
        # A job of another project is not even there to follow.
        follow = connect(f"/ws/jobs/{other.pk}?token={secret}")
        await follow.connect(timeout=TIMEOUT)
        closed = await follow.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": 4004}
        await ws.disconnect()

    run(scenario)


def test_a_job_socket_follows_one_job_from_its_snapshot() -> None:
    secret = key(Scope.JOBS_READ)

    async def scenario() -> None:
        job = await submit(pipeline="noop")
        other = await submit(pipeline="noop")
        ws = connect(f"/ws/jobs/{job.pk}?token={secret}")
        await ws.connect(timeout=TIMEOUT)
        snapshot = await ws.receive_json_from(timeout=TIMEOUT)
        assert snapshot["data"]["job"]["id"] == str(job.pk)
        assert snapshot["data"]["job"]["status"] == "pending"
        await cancel(other.pk)
        await cancel(job.pk)
        messages = await receive_until(
            ws, lambda m: m["type"] == "stage:update" and m["data"].get("status") == "cancelled"
        )
        assert {m["job_id"] for m in messages} == {str(job.pk)}
        await ws.disconnect()

    run(scenario)


@pytest.mark.parametrize("job_id", ["not-a-job", "x" * 300, "a%20b!"])
def test_a_job_socket_for_an_id_that_is_no_job_closes_with_4004(job_id: str) -> None:
    secret = key(Scope.JOBS_READ)

    async def scenario() -> None:
        ws = connect(f"/ws/jobs/{job_id}?token={secret}")
        await ws.connect(timeout=TIMEOUT)
        assert await ws.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4004}

    run(scenario)


@pytest.mark.parametrize(
    ("query", "code"),
    [("", 4001), ("?token=omv_nope_nope", 4001), ("?token={engines}", 4003), ("?after=x", 4001)],
)
def test_callers_without_a_valid_key_or_scope_are_refused(query: str, code: int) -> None:
    engines_only = key(Scope.ENGINES)

    async def scenario() -> None:
        ws = connect("/ws/events" + query.format(engines=engines_only))
        await ws.connect(timeout=TIMEOUT)
        assert await ws.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": code}

    run(scenario)


def test_a_socket_opened_with_a_key_marks_it_used_and_spends_its_rate_limit(
    settings: Any,
) -> None:
    """The websockets check a key as REST and gRPC do (omniva/access.py): its use is
    recorded, and a key over its rate limit is refused with 4029."""
    settings.OMNIVA_RATE_LIMIT = 0.01  # one connection per 100 s
    settings.OMNIVA_RATE_BURST = 1
    allowances.forget()
    secret = key(Scope.JOBS_READ)
    assert ApiKey.objects.get().last_used_at is None

    async def scenario() -> None:
        first = connect(f"/ws/events?token={secret}")
        assert (await first.connect(timeout=TIMEOUT))[0]
        await first.disconnect()
        second = connect(f"/ws/events?token={secret}")
        await second.connect(timeout=TIMEOUT)
        closed = await second.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": 4029}

    run(scenario)
    assert ApiKey.objects.get().last_used_at is not None


def test_a_revoked_key_opens_no_socket() -> None:
    secret = key(Scope.JOBS_READ)
    api_key_revoke(name=ApiKey.objects.get().name)

    async def scenario() -> None:
        ws = connect(f"/ws/events?token={secret}")
        await ws.connect(timeout=TIMEOUT)
        assert await ws.receive_output(timeout=TIMEOUT) == {"type": "websocket.close", "code": 4001}

    run(scenario)


def test_a_snapshot_shows_a_job_past_its_queue_timeout_as_timed_out() -> None:
    secret = key(Scope.JOBS_READ)
    job, _ = services.job_submit(pipeline="noop", queue_timeout_s=5)
    Job.objects.filter(pk=job.pk).update(pending_since=timezone.now() - timedelta(seconds=10))

    async def scenario() -> None:
        for path in ("/ws/events", f"/ws/jobs/{job.pk}"):
            ws = connect(f"{path}?token={secret}")
            await ws.connect(timeout=TIMEOUT)
            data = (await ws.receive_json_from(timeout=TIMEOUT))["data"]
            shown = data["jobs"][0] if "jobs" in data else data["job"]
            assert (shown["id"], shown["status"]) == (str(job.pk), "timed_out")
            await ws.disconnect()

    run(scenario)


def test_a_client_that_falls_behind_is_closed_with_4008_and_nothing_piles_up() -> None:
    from channels.exceptions import ChannelFull

    secret = key(Scope.JOBS_READ)

    async def scenario() -> None:
        layer = channel_layers["default"]
        layer.capacity = 3
        ws = connect(f"/ws/events?token={secret}")
        await ws.connect(timeout=TIMEOUT)
        await ws.receive_json_from(timeout=TIMEOUT)
        [channel] = layer.groups[live.GROUP_ALL]
        row = {
            "id": 1,
            "kind": "job:update",
            "job_id": None,
            "project_id": None,
            "data": {},
            "at": "2026-01-01T00:00:00+00:00",
        }
        message = {"type": "activity.rows", "rows": [(row["kind"], live.row_text(row))]}
        # Rows arrive faster than the consumer takes them: its queue fills up, and the
        # layer refuses the rest rather than keep them.
        refused = 0
        for _ in range(10):
            try:
                await layer.send(channel, message)
            except ChannelFull:
                refused += 1
        assert refused == 7
        assert channel in layer.overflowed
        output = await ws.receive_output(timeout=TIMEOUT)
        assert output == {"type": "websocket.close", "code": live.CLOSE_TOO_SLOW}
        await ws.disconnect()  # as daphne reports the closed connection
        assert channel not in layer.overflowed  # forgotten with the consumer
        assert channel not in layer.groups.get(live.GROUP_ALL, {})

    run(scenario)


def test_nothing_is_sent_while_the_connection_is_full_and_a_full_queue_closes_it() -> None:
    secret = key(Scope.JOBS_READ)

    def rows_message(n: int) -> dict[str, Any]:
        row = {"id": n, "kind": "log", "job_id": None, "data": {"n": n}, "at": "2026-01-01"}
        return {"type": "activity.rows", "rows": [("log", live.row_text(row))]}

    async def scenario() -> None:
        layer = channel_layers["default"]
        layer.capacity = 2
        flow = live.ConnectionFlow()
        ws = connect(f"/ws/events?token={secret}")
        ws.scope["omniva.flow"] = flow  # as FlowControlMiddleware does under daphne
        await ws.connect(timeout=TIMEOUT)
        await ws.receive_json_from(timeout=TIMEOUT)
        [channel] = layer.groups[live.GROUP_ALL]

        flow.pauseProducing()  # the client's connection takes no more data
        await layer.group_send(live.GROUP_ALL, rows_message(1))
        assert await ws.receive_nothing(timeout=0.3)
        flow.resumeProducing()
        assert (await ws.receive_json_from(timeout=TIMEOUT))["data"] == {"n": 1}

        flow.pauseProducing()
        for n in range(2, 6):  # one taken and waiting, two queued, one overflows
            await layer.group_send(live.GROUP_ALL, rows_message(n))
        assert channel in layer.overflowed
        output = await ws.receive_output(timeout=TIMEOUT)
        assert output == {"type": "websocket.close", "code": live.CLOSE_TOO_SLOW}
        await ws.disconnect()

    run(scenario)


def test_a_row_that_commits_after_a_later_one_is_delivered_first() -> None:
    import psycopg

    from omniva.models import Activity
    from omniva.notifications import own_connection_params

    secret = key(Scope.JOBS_READ)
    params = own_connection_params()

    async def scenario() -> None:
        ws = connect(f"/ws/events?token={secret}")
        await ws.connect(timeout=TIMEOUT)
        await ws.receive_json_from(timeout=TIMEOUT)
        # A transaction takes an id and stays open while later ones commit.
        slow = await psycopg.AsyncConnection.connect(**params)
        cursor = await slow.execute(
            "INSERT INTO omniva_activity (at, kind, data) VALUES (now(), 'log', '{}') RETURNING id"
        )
        (slow_id,) = await cursor.fetchone()
        job = await submit(pipeline="noop")
        committed = database_sync_to_async(lambda: Activity.objects.filter(job_id=job.pk).count())
        assert await committed() == 2
        await slow.commit()
        await slow.close()
        messages = await receive_until(ws, lambda m: m["type"] == "stage:update")
        # Held back until the earlier id committed, then delivered in id order: an id
        # is a cursor a client can resume from.
        assert messages[0]["id"] == slow_id
        assert [m["job_id"] for m in messages[1:]] == [str(job.pk)] * 2
        ids = [m["id"] for m in messages]
        assert ids == sorted(ids)
        await ws.disconnect()

    run(scenario)


def test_a_resume_while_an_earlier_row_is_in_flight_sends_nothing_out_of_order() -> None:
    import psycopg

    from omniva.models import Activity
    from omniva.notifications import own_connection_params

    secret = key(Scope.JOBS_READ)
    params = own_connection_params()

    async def scenario() -> None:
        first = connect(f"/ws/events?token={secret}&topics=jobs")
        await first.connect(timeout=TIMEOUT)
        cursor = (await first.receive_json_from(timeout=TIMEOUT))["cursor"]
        await first.disconnect()
        slow = await psycopg.AsyncConnection.connect(**params)
        inserted = await slow.execute(
            "INSERT INTO omniva_activity (at, kind, data) VALUES (now(), 'log', '{}') RETURNING id"
        )
        (slow_id,) = await inserted.fetchone()
        job = await submit(pipeline="noop")
        count = database_sync_to_async(lambda: Activity.objects.filter(job_id=job.pk).count())
        assert await count() == 2
        again = connect(f"/ws/events?token={secret}&topics=jobs&after={cursor}")
        await again.connect(timeout=TIMEOUT)
        await slow.commit()
        await slow.close()
        messages = await receive_until(again, lambda m: m["type"] == "stage:update")
        # Not the job's rows first (then a client resuming from them would skip slow_id).
        assert messages[0]["id"] == slow_id
        assert [m["id"] for m in messages] == sorted(m["id"] for m in messages)
        await again.disconnect()

    run(scenario)


def test_topics_and_a_project_narrow_the_stream_and_metrics_come_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(live, "METRICS_S", 0.2)
    project = Project.objects.create(name="narrow")
    secret = key(Scope.JOBS_READ)

    async def scenario() -> None:
        metrics_only = connect(f"/ws/events?token={secret}&topics=metrics")
        await metrics_only.connect(timeout=TIMEOUT)
        await metrics_only.receive_json_from(timeout=TIMEOUT)
        narrow = connect(f"/ws/events?token={secret}&topics=jobs&project={project.pk}")
        await narrow.connect(timeout=TIMEOUT)
        snapshot = await narrow.receive_json_from(timeout=TIMEOUT)
        assert snapshot["data"]["jobs"] == []
        await submit(pipeline="noop")  # no project: not for `narrow`
        own = await submit(pipeline="noop", project=project)
        first = await narrow.receive_json_from(timeout=TIMEOUT)
        assert first["job_id"] == str(own.pk)
        metrics = await metrics_only.receive_json_from(timeout=TIMEOUT)
        assert metrics["type"] == "metrics"
        assert "jobs" in metrics["data"]
        bad = connect(f"/ws/events?token={secret}&topics=weather")
        await bad.connect(timeout=TIMEOUT)
        assert await bad.receive_output(timeout=TIMEOUT) == {
            "type": "websocket.close",
            "code": 4400,
        }
        await metrics_only.disconnect()
        await narrow.disconnect()

    run(scenario)


def test_the_watermark_waits_for_a_hole_while_its_transaction_may_still_commit() -> None:
    running = frozenset({700, 701})
    mark = live.Watermark(10)
    mark.observe([11, 13, 14], now=0.0, in_progress=running)
    assert mark.low == 11  # 12 was taken by one of 700, 701: it may still commit
    assert mark.seen(13)
    assert not mark.seen(12)
    mark.advance(now=1.0, in_progress=frozenset({701, 702}))
    assert mark.low == 11  # 701 still runs
    mark.observe([12], now=2.0, in_progress=frozenset({702}))
    assert mark.low == 14
    # 15 missing, and none of the transactions running when that was seen runs now:
    # it was rolled back, so the hole is given up at once.
    mark.observe([16], now=3.0, in_progress=frozenset({800}))
    mark.advance(now=3.1, in_progress=frozenset())
    assert mark.low == 16


def test_the_watermark_gives_up_on_a_hole_after_the_grace_whatever_runs() -> None:
    mark = live.Watermark(0)
    mark.observe([2], now=0.0, in_progress=frozenset({9}))
    mark.advance(now=live.HOLE_GRACE_S - 0.1, in_progress=frozenset({9}))
    assert mark.low == 0
    mark.advance(now=live.HOLE_GRACE_S, in_progress=frozenset({9}))
    assert mark.low == 2
