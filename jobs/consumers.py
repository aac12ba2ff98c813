"""Websocket consumers of the live stream: `/ws/events` and `/ws/jobs/{id}`.

A client authenticates with its session (staff users) or `?token=<API key>` with the
`jobs:read` scope; a key bound to a project sees that project only. On connect it gets
a snapshot and a cursor, then one message per activity row (omniva/live.py):

    {"type": "snapshot", "cursor": 41, "jobs": [...]}            /ws/events
    {"type": "snapshot", "cursor": 41, "job": {...}, "logs": [...]}   /ws/jobs/{id}
    {"type": "job:update", "id": 42, "cursor": 42, "job_id": "…", "data": {...}}

With `?after=<cursor>` it gets, instead of the snapshot, every row after the cursor that
it may see, then the live ones. Rows may repeat across a reconnect: drop ids you have.
Close codes: 4001 not authenticated, 4003 not allowed, 4004 no such job, 4008 too slow
(reconnect with your cursor), 4400 a bad `after`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlparse

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.http.request import validate_host

from jobs import selectors
from jobs.api.serializers import JobLogSerializer, JobSerializer
from jobs.models import Job
from omniva import live
from omniva.models import Activity, Project, Scope
from omniva.selectors import api_key_for_secret

SNAPSHOT_JOBS = 50
SNAPSHOT_LOGS = 200
# A client further behind than this gets a fresh snapshot instead of the rows.
MAX_REPLAY = 10_000


class Refused(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class Caller:
    def __init__(self, project: Project | None) -> None:
        self.project = project


@database_sync_to_async
def _caller(scope: dict[str, Any], token: str | None) -> Caller:
    if token:
        key = api_key_for_secret(token)
        if key is None or not key.is_active:
            raise Refused(4001)
        if not key.has_scope(Scope.JOBS_READ):
            raise Refused(4003)
        return Caller(key.project)
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        raise Refused(4001)
    # A session rides along with any page's request: only this site's pages may use it
    # (a token is no ambient credential, so token clients need no Origin).
    if not _same_site_origin(scope):
        raise Refused(4003)
    if not user.is_staff:
        raise Refused(4003)
    return Caller(None)


def _same_site_origin(scope: dict[str, Any]) -> bool:
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = urlparse(origin).hostname if origin else None
    return bool(host) and validate_host(host, settings.ALLOWED_HOSTS)


@database_sync_to_async
def _events_snapshot(caller: Caller) -> dict[str, Any]:
    jobs = selectors.job_list(project=caller.project).prefetch_related("stages")[:SNAPSHOT_JOBS]
    return {"jobs": JobSerializer(jobs, many=True).data}


@database_sync_to_async
def _job_snapshot(job_id: str, caller: Caller) -> dict[str, Any] | None:
    job = selectors.job_for_caller(job_id=job_id, project=caller.project)
    if job is None:
        return None
    job = Job.objects.prefetch_related("stages").get(pk=job.pk)
    logs = list(job.logs.order_by("-id")[:SNAPSHOT_LOGS])[::-1]
    return {
        "job": JobSerializer(job, context={"with_estimate": True}).data,
        "logs": JobLogSerializer(logs, many=True).data,
    }


@database_sync_to_async
def _rows_after(after: int, caller: Caller, job_id: str | None) -> list[dict[str, Any]] | None:
    rows = Activity.objects.filter(id__gt=after).order_by("id")
    if job_id is not None:
        rows = rows.filter(job_id=job_id)
    elif caller.project is not None:
        rows = rows.filter(project_id=caller.project.pk)
    found = list(rows.values("id", "kind", "job_id", "data")[: MAX_REPLAY + 1])
    if len(found) > MAX_REPLAY:
        return None
    return [{**row, "job_id": str(row["job_id"]) if row["job_id"] else None} for row in found]


class ActivityConsumer(AsyncJsonWebsocketConsumer):
    """`/ws/events` (everything the caller may see) and `/ws/jobs/{id}` (one job)."""

    groups: list[str]

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode())
        job_id = self.scope["url_route"]["kwargs"].get("job_id")
        try:
            caller = await _caller(self.scope, (query.get("token") or [None])[0])
            after = self._after(query)
        except Refused as refused:
            # Accepted first so that the client sees the close code (a refused
            # handshake shows none).
            await self.accept()
            await self.close(code=refused.code)
            return
        await live.feed.ensure_running()
        if job_id is not None:
            group = live.group_for_job(job_id)
        elif caller.project is not None:
            group = live.group_for_project(caller.project.pk)
        else:
            group = live.GROUP_ALL
        # Join before reading anything: a row committed meanwhile comes twice at worst.
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups = [group]
        cursor = live.feed.cursor
        snapshot = (
            await _job_snapshot(job_id, caller)
            if job_id is not None
            else await _events_snapshot(caller)
        )
        await self.accept()
        if snapshot is None:
            await self.close(code=4004)
            return
        rows = await _rows_after(after, caller, job_id) if after is not None else None
        if rows is None:
            await self.send_json({"type": "snapshot", "cursor": cursor, **snapshot})
            return
        for row in rows:
            await self.send_json(live.row_message(row, cursor=row["id"]))

    @staticmethod
    def _after(query: dict[str, list[str]]) -> int | None:
        raw = (query.get("after") or [None])[0]
        if raw is None:
            return None
        if not raw.isdigit() or len(raw) > 18:
            raise Refused(4400)
        return int(raw)

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups", []):
            await self.channel_layer.group_discard(group, self.channel_name)
        layer = get_channel_layer()
        if isinstance(layer, live.LiveChannelLayer):
            layer.forget(self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Clients only listen; anything they send is ignored."""

    async def activity_row(self, message: dict[str, Any]) -> None:
        layer = self.channel_layer
        if isinstance(layer, live.LiveChannelLayer) and self.channel_name in layer.overflowed:
            await self.close(code=live.CLOSE_TOO_SLOW)
            return
        await self.send_json(live.row_message(message["row"], message["cursor"]))

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, cls=DjangoJSONEncoder)
