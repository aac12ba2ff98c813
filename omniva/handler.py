"""HTTP for the ASGI server: Django's sync request path in a fixed pool of threads.

Django's own ASGIHandler runs each request's sync middleware and view in a thread made
for that request (asgiref's ThreadSensitiveContext), so a database connection cannot
outlive its request: every request connects anew, and a request that waits holds its
thread and its connection for the whole wait. Measured on the 2-core machine
(docs/benchmarks.md): a bare Django view under one daphne process answers about 190
requests/s that way, and about 1,000/s through this handler.

This handler keeps a fixed pool of `OMNIVA_WEB_THREADS` threads per process. Each
thread keeps its own persistent database connection (CONN_MAX_AGE), so a process holds
at most that many connections whatever the load, and a request costs one hand-off to
a pool thread. The request goes through the same middleware, in the same order, as
under Django's handlers (sync mode, as under WSGI).

A view may park its response (omniva.api.parking): the thread returns to the pool as
soon as the view returns, and the request waits in the event loop for its listener's
notification. Each attempt to answer runs in a pool thread again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import IO, Any, cast

from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import HttpResponseBase
from django.urls import set_script_prefix
from rest_framework.response import Response

from omniva import audit, connection_health, health
from omniva.api.parking import PARKING_SCOPE_KEY, Parked

logger = logging.getLogger("omniva.handler")


Scope = dict[str, Any]


@dataclass
class PoolStats:
    """What the handler's pool is doing in this process (health and metrics)."""

    threads: int
    busy: int
    queued: int
    parked: int
    served: int

    @property
    def saturation(self) -> float:
        """Busy threads and requests waiting for one, over the pool's size."""
        return round((self.busy + self.queued) / self.threads, 3) if self.threads else 0.0


class PooledHTTPHandler(ASGIHandler):
    """An ASGI application for `http` scopes (websockets go to Channels)."""

    def __init__(self, *, threads: int) -> None:
        base.BaseHandler.__init__(self)
        self.load_middleware(is_async=False)
        self.threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="http")
        # Parked requests answer in threads of their own: when a burst of them wakes
        # (a thousand sync waits whose jobs finish together), new requests do not queue
        # behind their reads.
        self.settle_threads = max(1, threads // 2)
        self._settle_executor = ThreadPoolExecutor(
            max_workers=self.settle_threads, thread_name_prefix="http-parked"
        )
        self._lock = threading.Lock()
        self._submitted = 0  # handed to the pool and not finished
        self._running = 0
        self._parked = 0
        self._served = 0
        self._started = False

    def _start_serving(self) -> None:
        # On the first request, not at import: a process that only imports the ASGI
        # application (tests, commands) keeps writing its audit rows as it goes.
        global _serving
        if self._started:
            return
        self._started = True
        audit.start_writer(flush_interval_s=settings.OMNIVA_AUDIT_FLUSH_MS / 1000)
        _serving = self
        health.register_check("web", check_web, cached=False)

    # --- the pool -----------------------------------------------------------------------

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                threads=self.threads + self.settle_threads,
                busy=self._running,
                queued=self._submitted - self._running,
                parked=self._parked,
                served=self._served,
            )

    async def _in_pool(self, function: Any, *args: Any, parked: bool = False) -> Any:
        with self._lock:
            self._submitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._settle_executor if parked else self._executor,
                self._counted,
                function,
                *args,
            )
        finally:
            with self._lock:
                self._submitted -= 1

    def _counted(self, function: Any, *args: Any) -> Any:
        with self._lock:
            self._running += 1
        try:
            return function(*args)
        finally:
            with self._lock:
                self._running -= 1

    # --- a request ----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"PooledHTTPHandler serves http, not {scope['type']}.")
        self._start_serving()
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        scope = {**scope, PARKING_SCOPE_KEY: True}
        response: HttpResponseBase | None = None
        closed = False
        try:
            response, closed = await self._in_pool(self._respond, scope, body_file)
            parked: Parked | None = getattr(response, "parked", None)
            # Only the API's (DRF) responses park (omniva.api.parking).
            if parked is not None and not await self._settle(
                cast(Response, response), parked, receive
            ):
                return  # the client went away while it waited
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self.send_response(response, send)
        finally:
            if not closed:
                await self._in_pool(
                    self._finish, response, parked=getattr(response, "parked", None) is not None
                )
            body_file.close()
            with self._lock:
                self._served += 1

    def _respond(self, scope: Scope, body_file: IO[bytes]) -> tuple[HttpResponseBase, bool]:
        """The response, and whether it is closed already: a response whose body is all
        there (neither streamed nor parked) is closed in this same hand-off, before it
        is sent, instead of in a second one after."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        connection_health.health_checks_skip_for_busy_connections()
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None  # create_request gives one or the other
            return error_response, False
        response = self.get_response(request)
        # As ASGIHandler does (Django reads it back); the stubs do not declare it.
        response._handler_class = self.__class__  # type: ignore[attr-defined]
        if response.streaming or getattr(response, "parked", None) is not None:
            return response, False
        self._finish(response)
        return response, True

    def _finish(self, response: HttpResponseBase | None) -> None:
        # close() runs the response's closers (the audit row) and sends
        # request_finished, which keeps this thread's connection or drops a broken one.
        if response is not None:
            response.close()
        else:
            signals.request_finished.send(sender=self.__class__)
        connection_health.connections_work_finished()

    async def _settle(self, response: Response, parked: Parked, receive: Any) -> bool:
        """Wait until the parked response has its answer; False if the client left."""

        async def attempt(last: bool) -> bool | None:
            answered = await self._in_pool(
                partial(parked.attempt_rendered, response, last=last), parked=True
            )
            return True if answered else None

        with self._lock:
            self._parked += 1
        waiting = asyncio.ensure_future(
            parked.listener.wait_async(parked.payload, attempt, parked.timeout_s)
        )
        disconnected = asyncio.ensure_future(self._disconnected(receive))
        try:
            done, _ = await asyncio.wait(
                {waiting, disconnected}, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting in done:
                waiting.result()
                return True
            return False
        finally:
            for task in (waiting, disconnected):
                task.cancel()
            with self._lock:
                self._parked -= 1

    @staticmethod
    async def _disconnected(receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


_serving: PooledHTTPHandler | None = None


def check_web() -> dict[str, Any]:
    """/v1/health's `web` check: the request pool of the process that answers (a
    report; a busy pool is not a fault)."""
    stats = pool_stats()
    if stats is None:
        return {"status": "ok"}
    return {
        "status": "ok",
        "pid": os.getpid(),
        **asdict(stats),
        "saturation": stats.saturation,
        "audit_pending": audit.pending(),
    }


def pool_stats() -> PoolStats | None:
    """The pool of this process's handler; None where none serves (tests, commands)."""
    return _serving.stats() if _serving is not None else None
