"""Django's ping of a reused connection, skipped for a connection busy a moment ago.

With CONN_HEALTH_CHECKS Django pings a persistent connection before the first query of
every request (`close_old_connections` clears its flag), and django-q2's worker makes
each task a request of its own. That is a round trip per request or task on a busy
thread: 8-16% of the rate of GET /v1/jobs/{id} (docs/benchmarks.md), and one more
statement for each stage of a DAG that reads its parents' outputs. A connection that
finished its last unit of work less than HEALTH_CHECK_AFTER_IDLE_S ago is taken as
sound, as Django takes it within one request: if the database went away meanwhile, the
work fails (as any caught mid-way by a restart does) and Django drops the connection at
its end (errors_occurred), so the next one connects anew. An idle one is pinged.
"""

from __future__ import annotations

import time

from django.db import connections

HEALTH_CHECK_AFTER_IDLE_S = 1.0


def connections_work_finished() -> None:
    """This thread's connections finished a unit of work (a request, a task) now."""
    finished_at = time.monotonic()
    for connection in connections.all(initialized_only=True):
        connection.omniva_work_finished_at = finished_at  # type: ignore[attr-defined]


def health_checks_skip_for_busy_connections() -> None:
    """Before a unit of work, after Django's `close_old_connections`: this thread's
    connections that finished work a moment ago are not pinged."""
    now = time.monotonic()
    for connection in connections.all(initialized_only=True):
        finished_at = getattr(connection, "omniva_work_finished_at", None)
        if (
            connection.connection is not None
            and finished_at is not None
            and now - finished_at < HEALTH_CHECK_AFTER_IDLE_S
        ):
            # Django's own flag (BaseDatabaseWrapper, 4.1+); the stubs lack it.
            connection.health_check_done = True  # type: ignore[attr-defined]
