"""The live stream: the activity outbox, read once per server process, fanned out to
websocket consumers through channel-layer groups (DESIGN.md, decision 3).

Every transition writes an `omniva_activity` row and NOTIFYs `omniva_activity` at
commit (omniva/services.py). Each daphne process runs one `ActivityFeed`: a task on its
event loop that LISTENs on a connection of its own, reads the rows it has not seen, and
sends each to the groups that may see it: everything (`activity`), its project's, its
job's. Consumers (jobs/consumers.py) join the group their caller is scoped to.

The cursor. Row ids are taken at insert and transactions commit in their own order, so
id 11 can be visible while id 10 is still in flight. The feed delivers rows in id
order: a row above such a hole waits until the hole fills, or until no transaction
that was running when the hole was first seen still runs (the id was rolled back and
never commits; see Watermark), or at most HOLE_GRACE_S. So a message's id is a cursor:
a client that resumes with `?after=<id>` is sent everything after it. The exception is
a row whose transaction held its id past HOLE_GRACE_S: it is delivered when it
commits, after larger ids.

Backpressure. Groups deliver into bounded per-consumer queues (`LiveChannelLayer`).
A consumer whose queue filled up is marked; it closes with code 4008 at its next
message, and the client reconnects with its cursor. Memory never grows with a slow
client, and nothing is lost to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import secrets
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer, get_channel_layer

from omniva.models import ACTIVITY_CHANNEL
from omniva.notifications import own_connection_params
from omniva.selectors import service_metrics

logger = logging.getLogger("omniva.live")

# The longest a row above a hole waits for a transaction still in progress.
HOLE_GRACE_S = 30.0
# The feed reads at least this often, to give up on holes and recover a lost NOTIFY.
TICK_S = 1.0
FETCH_LIMIT = 500
# Ids given up on are looked for this long in case their transaction commits after all.
GIVEN_UP_KEPT_S = 120.0
# How often clients of /ws/events get a `metrics` message.
METRICS_S = 5.0
# Rows in one message to a consumer. With the layer's capacity (settings), it bounds
# what a slow consumer holds before it is closed: rows are shared, not copied.
ROWS_PER_MESSAGE = 50
# How often a consumer whose client's connection is full looks whether it fell behind.
STALL_CHECK_S = 0.5
# Close code of a consumer that fell behind; the client resumes with its cursor.
CLOSE_TOO_SLOW = 4008

GROUP_ALL = "activity"


def group_for_project(project_id: Any) -> str:
    return f"activity.project.{project_id}"


def group_for_job(job_id: Any) -> str:
    return f"activity.job.{job_id}"


class LiveChannelLayer(BaseChannelLayer):
    """Channels' in-process layer, made for one feed fanning rows out to many consumers.

    Where it differs from InMemoryChannelLayer, each difference measured (bench live):
    a message is shared by its receivers, not deep-copied (senders build each message
    once and no one changes it); a group send is one loop of put_nowait, not a task per
    member; nothing expires, because InMemoryChannelLayer scanned every queue and group
    for expired entries on each receive, which made a row cost O(consumers) per
    consumer. A member whose queue is full misses the message and is remembered in
    `overflowed`; its consumer closes (CLOSE_TOO_SLOW) and calls `forget`.
    """

    extensions = ["groups", "flush"]

    def __init__(self, capacity: int = 100, **kwargs: Any) -> None:
        super().__init__(capacity=capacity, **kwargs)
        self.queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.groups: dict[str, set[str]] = {}
        self.overflowed: set[str] = set()

    def _queue(self, channel: str) -> asyncio.Queue[dict[str, Any]]:
        queue = self.queues.get(channel)
        if queue is None:
            queue = self.queues[channel] = asyncio.Queue(maxsize=self.get_capacity(channel))
        return queue

    def _put(self, channel: str, message: dict[str, Any]) -> bool:
        try:
            self._queue(channel).put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed.add(channel)
            return False
        return True

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        if not self._put(channel, message):
            raise ChannelFull(channel)

    async def receive(self, channel: str) -> dict[str, Any]:
        self.require_valid_channel_name(channel)
        return await self._queue(channel).get()

    async def new_channel(self, prefix: str = "specific.") -> str:
        return f"{prefix}live!{secrets.token_hex(8)}"

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        self.groups.setdefault(group, set()).add(channel)

    async def group_discard(self, group: str, channel: str) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.discard(channel)
            if not members:
                del self.groups[group]

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        for channel in self.groups.get(group, ()):
            self._put(channel, message)

    def forget(self, channel: str) -> None:
        """A consumer is gone: drop its queue and its mark (its groups are left)."""
        self.queues.pop(channel, None)
        self.overflowed.discard(channel)

    async def flush(self) -> None:
        self.queues.clear()
        self.groups.clear()
        self.overflowed.clear()

    async def close(self) -> None:
        pass


class ConnectionFlow:
    """Whether a websocket client's connection takes more data.

    Daphne's send returns at once, and what a client does not read piles up in the
    connection's write buffer. Twisted's producer API is the way to see it: registered
    on the connection's transport, this is paused when the buffer
    passes its high-water mark (64 KiB) and resumed when it drains. While it is paused
    the consumer sends nothing: the rows wait in its bounded channel-layer queue, and
    when that fills the client is closed (CLOSE_TOO_SLOW).
    """

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    @classmethod
    def attach(cls, send: Any) -> ConnectionFlow | None:
        """The flow of the connection behind daphne's ASGI `send`, which is
        partial(server.handle_reply, protocol); None under other servers (uvicorn's
        send waits for the buffer itself) and channels' test communicator."""
        protocol = send.args[0] if isinstance(send, functools.partial) and send.args else None
        transport = getattr(protocol, "transport", None)
        if transport is None or not hasattr(transport, "registerProducer"):
            return None
        # Daphne leaves the HTTP channel that upgraded the connection registered as its
        # producer; it has no part in the connection any longer, which is ours now.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        flow = cls()
        transport.registerProducer(flow, True)
        return flow

    # Twisted's IPushProducer, called on the event loop's thread.
    def pauseProducing(self) -> None:
        self.writable.clear()

    def resumeProducing(self) -> None:
        self.writable.set()

    def stopProducing(self) -> None:
        self.writable.set()  # the connection is gone: nothing waits on it any longer


class FlowControlMiddleware:
    """Gives each websocket connection its ConnectionFlow as scope["omniva.flow"]."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket":
            flow = ConnectionFlow.attach(send)
            if flow is not None:
                scope = {**scope, "omniva.flow": flow}
        return await self.app(scope, receive, send)


class Watermark:
    """The stream position below which every row was seen or given up on.

    A hole (an id below one seen, not seen itself) is waited for while a transaction
    that was in progress when the hole was first seen still is: the one that took the
    id is among them. Once none is and the row has not come, it was rolled back and the
    hole is given up at once. HOLE_GRACE_S bounds the wait for a very long transaction.
    """

    def __init__(self, low: int) -> None:
        self.low = low
        self._seen: set[int] = set()
        self._holes: dict[int, tuple[float, frozenset[int]]] = {}

    def observe(self, ids: Iterable[int], now: float, in_progress: frozenset[int]) -> None:
        """`ids` read in one snapshot, in which `in_progress` were the running xids."""
        for row_id in ids:
            if row_id > self.low:
                self._seen.add(row_id)
        top = max(self._seen, default=self.low)
        for row_id in range(self.low + 1, top):
            if row_id not in self._seen:
                self._holes.setdefault(row_id, (now, in_progress))
        self.advance(now, in_progress)

    def advance(self, now: float, in_progress: frozenset[int]) -> None:
        while True:
            following = self.low + 1
            if following in self._seen:
                self._seen.discard(following)
            else:
                hole = self._holes.get(following)
                if hole is None:
                    return
                since, waiting_on = hole
                if waiting_on & in_progress and now - since < HOLE_GRACE_S:
                    return
            self._holes.pop(following, None)
            self.low = following

    def seen(self, row_id: int) -> bool:
        return row_id <= self.low or row_id in self._seen


def row_message(row: dict[str, Any]) -> dict[str, Any]:
    """What a consumer sends its client for one activity row (API.md, Websockets)."""
    return {
        "type": row["kind"],
        "id": row["id"],
        "at": row["at"],
        "job_id": row["job_id"],
        "data": row["data"],
    }


def row_text(row: dict[str, Any]) -> str:
    """`row_message` as the JSON text of its frame (encoded once for every client)."""
    return json.dumps(row_message(row))


class ActivityFeed:
    """One per process: started by the first consumer, runs on the server's loop."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.watermark: Watermark | None = None
        self.ready = asyncio.Event()
        # Rows read above a hole, delivered once the watermark passes them.
        self._held: dict[int, dict[str, Any]] = {}
        # Ids given up on (monotonic time when): delivered late should they commit.
        self._given_up: dict[int, float] = {}
        self._last_metrics = 0.0

    async def ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        # A task of another loop (a test's, long closed) does not run here.
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.ready = asyncio.Event()
            # A context of its own: a task copies its creator's, and the consumer that
            # happens to start the feed must not lend it its (per-connection) executor
            # for sync calls, which would stop with that connection.
            self.task = loop.create_task(self._run(), context=contextvars.Context())
        await asyncio.wait_for(self.ready.wait(), timeout=10)

    @property
    def cursor(self) -> int:
        """Every row up to here has been delivered (or given up on)."""
        return self.watermark.low if self.watermark else 0

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None

    async def _run(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    **own_connection_params(), autocommit=True
                ) as conn:
                    await conn.execute(f'LISTEN "{ACTIVITY_CHANNEL}"')
                    if self.watermark is None:
                        cursor = await conn.execute(
                            "SELECT COALESCE(MAX(id), 0) FROM omniva_activity"
                        )
                        row = await cursor.fetchone()
                        self.watermark = Watermark(int(row[0]) if row else 0)
                    self.ready.set()
                    while True:
                        await self._read_and_fan_out(conn)
                        await self._send_metrics()
                        async for _notify in conn.notifies(timeout=TICK_S, stop_after=1):
                            pass
                        # Every wake-up buffered meanwhile is answered by the next read:
                        # read them all now (one per loop, they would pile up).
                        async for _notify in conn.notifies(timeout=0):
                            pass
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                logger.warning("activity feed lost its connection (%s)", type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _read_and_fan_out(self, conn: psycopg.AsyncConnection) -> None:
        assert self.watermark is not None
        now = time.monotonic()
        self._given_up = {i: t for i, t in self._given_up.items() if now - t < GIVEN_UP_KEPT_S}
        # One snapshot for the rows and the transactions then in progress (see Watermark).
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cursor = await conn.execute("SELECT pg_snapshot_xip(pg_current_snapshot())::text")
            in_progress = frozenset(int(row[0]) for row in await cursor.fetchall())
            rows = await self._rows(conn)
        deliver: list[dict[str, Any]] = []
        for row in rows:
            if self._given_up.pop(row["id"], None) is not None:
                deliver.append(row)  # late: its hole was given up on
            elif not self.watermark.seen(row["id"]):
                self._held[row["id"]] = row
        before = self.watermark.low
        self.watermark.observe(
            (row["id"] for row in rows if row["id"] > before), time.monotonic(), in_progress
        )
        deliver.extend(self._release(before))
        await self._fan_out(deliver)

    async def _rows(self, conn: psycopg.AsyncConnection) -> list[dict[str, Any]]:
        assert self.watermark is not None
        rows: list[dict[str, Any]] = []
        after = self.watermark.low
        while True:
            cursor = await conn.execute(
                "SELECT id, kind, project_id, job_id, data, at FROM omniva_activity"
                " WHERE id > %s OR id = ANY(%s) ORDER BY id LIMIT %s",
                [after, list(self._given_up), FETCH_LIMIT],
            )
            page = [
                {
                    "id": row[0],
                    "kind": row[1],
                    "project_id": str(row[2]) if row[2] else None,
                    "job_id": str(row[3]) if row[3] else None,
                    "data": row[4],
                    "at": row[5].isoformat(),
                }
                for row in await cursor.fetchall()
            ]
            rows.extend(page)
            if len(page) < FETCH_LIMIT:
                return rows
            after = max(after, page[-1]["id"])

    def _release(self, before: int) -> list[dict[str, Any]]:
        """The held rows the watermark has passed, in id order; the ids it gave up on
        are remembered."""
        assert self.watermark is not None
        released = []
        for row_id in range(before + 1, self.watermark.low + 1):
            row = self._held.pop(row_id, None)
            if row is None:
                self._given_up[row_id] = time.monotonic()
            else:
                released.append(row)
        return released

    async def _fan_out(self, rows: list[dict[str, Any]]) -> None:
        """One message per group for what one read brought (ROWS_PER_MESSAGE at most),
        each row encoded once for every consumer: a consumer wakes once per read, not
        once per row, and sends the frames as they are."""
        by_group: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            entry = (row["kind"], row_text(row))
            by_group.setdefault(GROUP_ALL, []).append(entry)
            if row["project_id"]:
                by_group.setdefault(group_for_project(row["project_id"]), []).append(entry)
            if row["job_id"]:
                by_group.setdefault(group_for_job(row["job_id"]), []).append(entry)
        layer = _channel_layer()
        for group, entries in by_group.items():
            for start in range(0, len(entries), ROWS_PER_MESSAGE):
                chunk = entries[start : start + ROWS_PER_MESSAGE]
                await layer.group_send(group, {"type": "activity.rows", "rows": chunk})

    async def _send_metrics(self) -> None:
        """Every METRICS_S, the figures of /v1/metrics to unscoped clients (API.md)."""
        now = time.monotonic()
        if now - self._last_metrics < METRICS_S:
            return
        self._last_metrics = now
        try:
            figures = await asyncio.to_thread(_metrics_now)
        except Exception as exc:  # the database is down: the next tick tries again
            logger.warning("live metrics unavailable: %s", type(exc).__name__)
            return
        await _channel_layer().group_send(GROUP_ALL, {"type": "activity.metrics", "data": figures})


def _channel_layer() -> BaseChannelLayer:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer: settings.CHANNEL_LAYERS has no default")
    return layer


def _metrics_now() -> dict[str, Any]:
    """/v1/metrics's figures, on a worker thread with a connection of its own (closed
    after: the thread is not one of Django's request threads)."""
    from django.db import connections

    try:
        return service_metrics()
    finally:
        connections.close_all()


feed = ActivityFeed()
