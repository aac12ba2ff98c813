"""The live stream: the activity outbox, read once per server process, fanned out to
websocket consumers through channel-layer groups (DESIGN.md, decision 3).

Every transition writes an `omniva_activity` row and NOTIFYs `omniva_activity` at
commit (omniva/services.py). Each daphne process runs one `ActivityFeed`: a task on its
event loop that LISTENs on a connection of its own, reads the rows it has not seen, and
sends each to the groups that may see it: everything (`activity`), its project's, its
job's. Consumers (jobs/consumers.py) join the group their caller is scoped to.

The cursor. Row ids are taken at insert and transactions commit in their own order, so
id 11 can be visible while id 10 is still in flight. The feed keeps a watermark: the
highest id below which every row has been seen, or given up on after HOLE_GRACE_S (an
id a rolled-back transaction took never commits). Each message carries the watermark
no higher than its own id, so a client that resumes with `?after=<cursor>` is sent
again everything it may have missed (and some it has seen: rows are idempotent states
with ids, clients drop ids they have).

Backpressure. Groups deliver into bounded per-consumer queues (`LiveChannelLayer`).
A consumer whose queue filled up is marked; it closes with code 4008 at its next
message, and the client reconnects with its cursor. Memory never grows with a slow
client, and nothing is lost to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import psycopg
from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer, get_channel_layer

from omniva.notifications import own_connection_params
from omniva.services import ACTIVITY_CHANNEL

logger = logging.getLogger("omniva.live")

# An id not seen this long after a larger one was is taken as never coming.
HOLE_GRACE_S = 5.0
# The feed reads at least this often, to give up on holes and recover a lost NOTIFY.
TICK_S = 1.0
FETCH_LIMIT = 500
# Close code of a consumer that fell behind; the client resumes with its cursor.
CLOSE_TOO_SLOW = 4008

GROUP_ALL = "activity"


def group_for_project(project_id: Any) -> str:
    return f"activity.project.{project_id}"


def group_for_job(job_id: Any) -> str:
    return f"activity.job.{job_id}"


class LiveChannelLayer(InMemoryChannelLayer):
    """In-process groups that remember which consumers' queues overflowed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.overflowed: set[str] = set()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        try:
            await super().send(channel, message)
        except ChannelFull:
            self.overflowed.add(channel)
            raise

    def forget(self, channel: str) -> None:
        self.overflowed.discard(channel)


class Watermark:
    """The stream position below which every row was seen or given up on."""

    def __init__(self, low: int) -> None:
        self.low = low
        self._seen: set[int] = set()
        self._holes: dict[int, float] = {}

    def observe(self, ids: Iterable[int], now: float) -> None:
        for row_id in ids:
            if row_id > self.low:
                self._seen.add(row_id)
        top = max(self._seen, default=self.low)
        for row_id in range(self.low + 1, top):
            if row_id not in self._seen:
                self._holes.setdefault(row_id, now)
        self.advance(now)

    def advance(self, now: float) -> None:
        while True:
            following = self.low + 1
            if following in self._seen:
                self._seen.discard(following)
            else:
                since = self._holes.get(following)
                if since is None or now - since < HOLE_GRACE_S:
                    return
            self._holes.pop(following, None)
            self.low = following

    def seen(self, row_id: int) -> bool:
        return row_id <= self.low or row_id in self._seen


def row_message(row: dict[str, Any], cursor: int) -> dict[str, Any]:
    """What a consumer sends its client for one activity row."""
    return {
        "type": row["kind"],
        "id": row["id"],
        "cursor": min(cursor, row["id"]),
        "job_id": row["job_id"],
        "data": row["data"],
    }


class ActivityFeed:
    """One per process: started by the first consumer, runs on the server's loop."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.watermark: Watermark | None = None
        self.ready = asyncio.Event()

    async def ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        # A task of another loop (a test's, long closed) does not run here.
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.ready = asyncio.Event()
            self.task = loop.create_task(self._run())
        await asyncio.wait_for(self.ready.wait(), timeout=10)

    @property
    def cursor(self) -> int:
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
                        async for _notify in conn.notifies(timeout=TICK_S, stop_after=1):
                            pass
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                logger.warning("activity feed lost its connection (%s)", type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _read_and_fan_out(self, conn: psycopg.AsyncConnection) -> None:
        assert self.watermark is not None
        layer = get_channel_layer()
        after = self.watermark.low
        while True:
            cursor = await conn.execute(
                "SELECT id, kind, project_id, job_id, data FROM omniva_activity"
                " WHERE id > %s ORDER BY id LIMIT %s",
                [after, FETCH_LIMIT],
            )
            rows = [
                {
                    "id": row[0],
                    "kind": row[1],
                    "project_id": str(row[2]) if row[2] else None,
                    "job_id": str(row[3]) if row[3] else None,
                    "data": row[4],
                }
                for row in await cursor.fetchall()
            ]
            fresh = [row for row in rows if not self.watermark.seen(row["id"])]
            self.watermark.observe((row["id"] for row in rows), time.monotonic())
            for row in fresh:
                message = {"type": "activity.row", "row": row, "cursor": self.watermark.low}
                await layer.group_send(GROUP_ALL, message)
                if row["project_id"]:
                    await layer.group_send(group_for_project(row["project_id"]), message)
                if row["job_id"]:
                    await layer.group_send(group_for_job(row["job_id"]), message)
            if len(rows) < FETCH_LIMIT:
                self.watermark.advance(time.monotonic())
                return
            after = rows[-1]["id"]


feed = ActivityFeed()
