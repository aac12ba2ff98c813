"""Waiting on a PostgreSQL NOTIFY channel: one LISTEN session per process, many waiters.

Transitions NOTIFY in their own transaction, so a notification arrives exactly when what
it announces is committed (a job finished, an event became claimable). A process that
serves waits (sync job submissions, long-polling claims) keeps one listener thread per
channel on a connection of its own, and wakes the waiters of a payload. A waiter reads
its condition after registering and before sleeping, so a change committed in between
is not missed, and reads it again every few seconds in case the listener was
reconnecting when the notification went out.

Waiters are of two kinds: a thread blocked in `wait_until` (management commands, gRPC,
the gpu worker), or a coroutine (`wait_async`): a parked HTTP request
(omniva/handler.py) that holds neither a thread nor a database connection while it
waits. The listener thread wakes a coroutine through its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from django.db import connection

logger = logging.getLogger("omniva.notifications")

T = TypeVar("T")

RECHECK_S = 5.0
STOP_CHECK_S = 1.0


def own_connection_params() -> dict[str, Any]:
    """Django's connection settings, for a psycopg connection that Django does not manage
    (a LISTEN must stay registered on one session that nothing else closes)."""
    params = connection.get_connection_params()
    for key in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(key, None)
    return params


class _LoopEvent:
    """An asyncio.Event that the listener thread can set."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.event = asyncio.Event()

    def set(self) -> None:
        self._loop.call_soon_threadsafe(self.event.set)


class Listener:
    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event | _LoopEvent]] = defaultdict(set)
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._params: dict[str, Any] | None = None
        self._stopping = threading.Event()

    @property
    def started(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._listening.is_set()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._params = own_connection_params()
            self._thread = threading.Thread(
                target=self._run, name=f"listen-{self.channel}", daemon=True
            )
            self._thread.start()
        self._listening.wait(timeout=5)

    def stop(self) -> None:
        """Stop listening (tests; a server's listener lives as long as its process)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout=5)
        self._thread = None
        self._stopping.clear()
        self._listening.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(**(self._params or {}), autocommit=True) as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    self._listening.set()
                    self._wake_all()  # anything that happened while we were reconnecting
                    while not self._stopping.is_set():
                        for notify in conn.notifies(timeout=STOP_CHECK_S):
                            self._wake(notify.payload)
            except psycopg.Error as exc:
                self._listening.clear()
                logger.warning(
                    "listener of %s lost its connection (%s)", self.channel, type(exc).__name__
                )
                time.sleep(0.5)

    def _wake(self, payload: str) -> None:
        with self._lock:
            for event in self._waiters.get(payload, ()):
                event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for events in self._waiters.values():
                for event in events:
                    event.set()

    async def wait_async(
        self,
        payload: str,
        attempt: Callable[[bool], Awaitable[T | None]],
        timeout_s: float,
    ) -> T:
        """The first value `attempt(last)` returns that is not None. It is awaited once
        the waiter is registered (so nothing committed before is missed), again on each
        notification of `payload` (and every RECHECK_S), and a last time with
        `last=True` when `timeout_s` ran out, when it must return a value. Nothing is
        held between attempts but this coroutine."""
        if not self.started:
            # Starting blocks until the LISTEN is in place: not on the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self._ensure_started)
        waiter = _LoopEvent(asyncio.get_running_loop())
        with self._lock:
            self._waiters[payload].add(waiter)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                # Cleared before the attempt: a notification during it wakes the next.
                waiter.event.clear()
                remaining = deadline - time.monotonic()
                value = await attempt(remaining <= 0)
                if value is not None:
                    return value
                if remaining <= 0:
                    raise RuntimeError("attempt(last=True) returned None")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.event.wait(), min(remaining, RECHECK_S))
        finally:
            with self._lock:
                self._waiters[payload].discard(waiter)
                if not self._waiters[payload]:
                    del self._waiters[payload]

    def wait_until(
        self, payload: str, read: Callable[[], T], done: Callable[[T], bool], timeout_s: float
    ) -> T:
        """`read()` once it is `done`, or as it stands when `timeout_s` ran out; read
        again on each notification of `payload` (and every RECHECK_S)."""
        self._ensure_started()
        event = threading.Event()
        with self._lock:
            self._waiters[payload].add(event)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                value = read()
                remaining = deadline - time.monotonic()
                if done(value) or remaining <= 0:
                    return value
                event.wait(min(remaining, RECHECK_S))
                event.clear()
        finally:
            with self._lock:
                self._waiters[payload].discard(event)
                if not self._waiters[payload]:
                    del self._waiters[payload]
