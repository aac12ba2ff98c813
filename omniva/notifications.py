"""Waiting on a PostgreSQL NOTIFY channel: one LISTEN session per process, many waiters.

Transitions NOTIFY in their own transaction, so a notification arrives exactly when what
it announces is committed (a job finished, an event became claimable). A process that
serves waits (sync job submissions, long-polling claims) keeps one listener thread per
channel on a connection of its own, and wakes the waiters of a payload. A waiter reads
its condition after registering and before sleeping, so a change committed in between
is not missed, and reads it again every few seconds in case the listener was
reconnecting when the notification went out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
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


class Listener:
    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._params: dict[str, Any] | None = None
        self._stopping = threading.Event()

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
