"""The audit trail's writer in a web process: rows batched, one COPY per flush.

Every /v1 request leaves one AuditRecord (omniva.api.middleware.AuditMiddleware). A row
written and committed by each request costs a commit, and the commit's WAL flush, per
request. In a web process (omniva/handler.py starts the writer) the rows go to a buffer
instead, and a thread writes what gathered every OMNIVA_AUDIT_FLUSH_MS in one COPY.

What can be lost: on SIGTERM nothing (the process flushes at exit, after its requests
finished); on SIGKILL of a web process, or a crash of the machine, the rows of the
last flush interval. While the database is unavailable the rows wait, up to
MAX_PENDING, and are written when it is back. Where no writer runs (tests, commands)
each row is written when its request ends.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any

from django.db import connection

from omniva import services

logger = logging.getLogger("omniva.audit")

MAX_PENDING = 20_000


class AuditWriter:
    def __init__(self, *, flush_interval_s: float) -> None:
        self.flush_interval_s = flush_interval_s
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._dropped = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()
        atexit.register(self.stop)

    def add(self, fields: dict[str, Any]) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop(0)
                self._dropped += 1
            self._pending.append(fields)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> bool:
        """Write what is pending; False (rows kept) when the database is unavailable."""
        with self._lock:
            rows, self._pending = self._pending, []
            dropped, self._dropped = self._dropped, 0
        if dropped:
            logger.warning("dropped %d audit records while the database was unavailable", dropped)
        if services.audit_records_write(records=rows):
            return True
        connection.close()  # broken; the next flush connects again
        with self._lock:
            self._pending[:0] = rows[: MAX_PENDING - len(self._pending)]
        return False

    def stop(self) -> None:
        """Write what is left and stop (at exit: after the request threads finished)."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.flush()
        connection.close()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.flush_interval_s)
            if self._stopping.is_set():
                break
            if not self.flush():
                self._stopping.wait(1.0)  # the database is away; do not spin
        connection.close()


_writer: AuditWriter | None = None


def start_writer(*, flush_interval_s: float) -> AuditWriter:
    """Batch this process's audit rows from now on (a web process, once)."""
    global _writer
    if _writer is None:
        _writer = AuditWriter(flush_interval_s=flush_interval_s)
        _writer.start()
    return _writer


def pending() -> int:
    """Rows waiting for the next flush in this process."""
    return _writer.pending() if _writer is not None else 0


def record(fields: dict[str, Any]) -> None:
    """One request's audit row: to the batch, or written now where no writer runs."""
    if _writer is not None:
        _writer.add(fields)
    else:
        services.audit_record_write(**fields)
