"""Websocket consumers of the live stream: `/ws/events` and `/ws/jobs/{id}` (API.md,
Websockets; the protocol is in docs/live.md).

A client authenticates with its session (staff users, from this site's pages) or
`?token=<API key>` with the `jobs:read` scope; a key bound to a project sees that
project only. `/ws/events` takes `?topics=jobs,engines,events,metrics` (default all)
and, for callers not bound to a project, `?project=<id>`. On connect it gets a
snapshot and its cursor, then one message per change:

    {"type": "snapshot", "cursor": 41, "data": {"jobs": [...]}}         /ws/events
    {"type": "snapshot", "cursor": 41, "data": {"job": {...}, "logs": [...]}}
    {"type": "job:update", "id": 42, "at": "…", "job_id": "…", "data": {...}}
    {"type": "metrics", "at": "…", "data": {...}}          (every few seconds)

With `?after=<cursor>` it gets, instead of the snapshot, every change after the cursor
that it may see, then the live ones; a change may come twice across a reconnect (drop
ids you have). Close codes: 4001 not authenticated, 4003 not allowed, 4004 no such job
or project, 4008 too slow (reconnect with your cursor), 4400 a bad parameter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlparse

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.http.request import validate_host
from django.utils import timezone

from jobs import selectors, services
from jobs.api.serializers import JobLogSerializer, JobSerializer
from omniva import access, live
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Activity, Project, Scope
from omniva.row_ids import row_id

TOPICS = {"jobs", "engines", "events", "metrics"}
# Which topic each kind of row belongs to.
TOPIC_OF_KIND = {
    "job:update": "jobs",
    "job:progress": "jobs",
    "job:deleted": "jobs",
    "stage:update": "jobs",
    "log": "jobs",
    "engine:update": "engines",
    "engine:deregistered": "engines",
    "event:update": "events",
}
SNAPSHOT_JOBS = 50
SNAPSHOT_LOGS = 200
# A client further behind than this gets a fresh snapshot instead of the rows.
MAX_REPLAY = 10_000


# How a refused key closes the socket (docs/live.md).
CLOSE_CODE_OF_ERROR = {
    ErrorCode.UNAUTHENTICATED: 4001,
    ErrorCode.PERMISSION_DENIED: 4003,
    ErrorCode.RATE_LIMITED: 4029,
}


class Refused(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class Caller:
    def __init__(self, project: Project | None) -> None:
        self.project = project


@database_sync_to_async
def _caller(scope: Mapping[str, Any], token: str | None) -> Caller:
    if token:
        try:
            key = access.api_key_authenticate(raw=token)
            access.api_key_admit(key=key, scope=Scope.JOBS_READ)
        except OmnivaError as error:
            raise Refused(CLOSE_CODE_OF_ERROR.get(error.code, 4001)) from None
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


def _same_site_origin(scope: Mapping[str, Any]) -> bool:
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = urlparse(origin).hostname if origin else None
    if not host:
        return False
    return validate_host(host, settings.ALLOWED_HOSTS)


@database_sync_to_async
def _project(project_id: str) -> Project | None:
    try:
        return Project.objects.filter(pk=project_id).first()
    except (ValueError, DjangoValidationError):
        return None


@database_sync_to_async
def _events_snapshot(project: Project | None) -> dict[str, Any]:
    listed = selectors.job_list(project=project).prefetch_related(selectors.STAGES_IN_ORDER)
    jobs = services.jobs_settle_due(jobs=list(listed[:SNAPSHOT_JOBS]))
    return {"jobs": JobSerializer(jobs, many=True).data}


@database_sync_to_async
def _job_snapshot(job_id: str, caller: Caller) -> dict[str, Any] | None:
    job = selectors.job_for_caller(job_id=job_id, project=caller.project, with_stages=True)
    if job is None:
        return None
    [job] = services.jobs_settle_due(jobs=[job])
    logs = list(job.logs.order_by("-id")[:SNAPSHOT_LOGS])[::-1]
    return {
        "job": JobSerializer(job, context={"with_estimate": True}).data,
        "logs": JobLogSerializer(logs, many=True).data,
    }


@database_sync_to_async
def _rows_after(
    after: int, upto: int, project: Project | None, job_id: str | None
) -> list[dict[str, Any]] | None:
    """The rows after `after` up to the feed's cursor: later ones come live, in id order
    (a replay past the cursor could send 5 before a 3 still in flight)."""
    rows = Activity.objects.filter(id__gt=after, id__lte=upto).order_by("id")
    if job_id is not None:
        rows = rows.filter(job_id=job_id)
    elif project is not None:
        rows = rows.filter(project_id=project.pk)
    found = list(rows.values("id", "kind", "job_id", "data", "at")[: MAX_REPLAY + 1])
    if len(found) > MAX_REPLAY:
        return None
    return [
        {
            **row,
            "job_id": str(row["job_id"]) if row["job_id"] else None,
            "at": row["at"].isoformat(),
        }
        for row in found
    ]


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


class ActivityConsumer(AsyncJsonWebsocketConsumer):
    """`/ws/events` (everything the caller may see) and `/ws/jobs/{id}` (one job)."""

    groups: list[str]
    topics: set[str]
    metrics: bool = False

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode())
        job_id = self.scope["url_route"]["kwargs"].get("job_id")
        try:
            caller = await _caller(self.scope, _one(query, "token"))
            after = self._after(query)
            self.topics = self._topics(query)
            project = await self._scope_project(caller, _one(query, "project"))
            if job_id is not None:
                job_id = self._job_id(job_id)
        except Refused as refused:
            # Accepted first so that the client sees the close code (a refused
            # handshake shows none).
            await self.accept()
            await self.close(code=refused.code)
            return
        await live.feed.ensure_running()
        if job_id is not None:
            group = live.group_for_job(job_id)
        elif project is not None:
            group = live.group_for_project(project.pk)
        else:
            group = live.GROUP_ALL
        self.metrics = job_id is None and caller.project is None and "metrics" in self.topics
        # Join before reading anything: a change committed meanwhile comes twice at worst.
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups = [group]
        cursor = live.feed.cursor
        snapshot = (
            await _job_snapshot(job_id, caller)
            if job_id is not None
            else await _events_snapshot(project)
        )
        await self.accept()
        if snapshot is None:
            await self.close(code=4004)
            return
        rows = await _rows_after(after, cursor, project, job_id) if after is not None else None
        if rows is None:
            await self.send_json({"type": "snapshot", "cursor": cursor, "data": snapshot})
            return
        for row in rows:
            await self._send_row(row["kind"], live.row_text(row))

    @staticmethod
    def _job_id(raw: str) -> str:
        # Checked before it names a group (group names allow few characters): a job id
        # that is no UUID is no job.
        try:
            return str(uuid.UUID(raw))
        except ValueError:
            raise Refused(4004) from None

    @staticmethod
    def _topics(query: dict[str, list[str]]) -> set[str]:
        raw = _one(query, "topics")
        if raw is None:
            return set(TOPICS)
        topics = {topic.strip() for topic in raw.split(",") if topic.strip()}
        if not topics or not topics <= TOPICS:
            raise Refused(4400)
        return topics

    @staticmethod
    async def _scope_project(caller: Caller, project_id: str | None) -> Project | None:
        """The project the stream is limited to: a bound key's, or the one asked for."""
        if caller.project is not None:
            if project_id is not None and project_id != str(caller.project.pk):
                raise Refused(4003)
            return caller.project
        if project_id is None:
            return None
        project = await _project(project_id)
        if project is None:
            raise Refused(4004)
        return project

    async def _send_row(self, kind: str, text: str) -> None:
        if TOPIC_OF_KIND.get(kind, "jobs") in self.topics:
            await self.send(text_data=text)

    @staticmethod
    def _after(query: dict[str, list[str]]) -> int | None:
        raw = _one(query, "after")
        if raw is None:
            return None
        after = row_id(raw)
        if after is None:
            raise Refused(4400)
        return after

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "groups", []):
            await self.channel_layer.group_discard(group, self.channel_name)
        layer = get_channel_layer()
        if isinstance(layer, live.LiveChannelLayer):
            layer.forget(self.channel_name)

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels closes stale database connections (a sync thread hop) before every
        # handler; the stream's handlers touch no database, and with many clients that
        # hop per row per client was most of a row's cost (docs/benchmarks.md).
        if message["type"] == "activity.rows":
            await self.activity_rows(message)
        elif message["type"] == "activity.metrics":
            await self.activity_metrics(message)
        else:
            await super().dispatch(message)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Clients only listen; anything they send is ignored."""

    async def _fell_behind(self) -> bool:
        layer = self.channel_layer
        if isinstance(layer, live.LiveChannelLayer) and self.channel_name in layer.overflowed:
            await self.close(code=live.CLOSE_TOO_SLOW)
            return True
        return False

    async def _may_send(self) -> bool:
        """Whether to send now. While the client's connection takes no more data, wait
        (what comes meanwhile waits in this consumer's bounded queue); False once the
        client fell behind and was closed."""
        # Set by live.FlowControlMiddleware (absent under the test communicator).
        found = self.scope.get("omniva.flow")
        flow = found if isinstance(found, live.ConnectionFlow) else None
        while flow is not None and not flow.writable.is_set():
            # Woken by the connection draining; looks every STALL_CHECK_S whether the
            # queue filled meanwhile.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(flow.writable.wait(), live.STALL_CHECK_S)
            if await self._fell_behind():
                return False
        return not await self._fell_behind()

    async def activity_rows(self, message: dict[str, Any]) -> None:
        if await self._may_send():
            for kind, text in message["rows"]:
                await self._send_row(kind, text)

    async def activity_metrics(self, message: dict[str, Any]) -> None:
        if self.metrics and await self._may_send():
            await self.send_json(
                {"type": "metrics", "at": timezone.now().isoformat(), "data": message["data"]}
            )

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, cls=DjangoJSONEncoder)
