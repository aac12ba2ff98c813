"""Fixed statements of the hot paths, run as server-side prepared statements.

Django's PostgreSQL backend binds parameters on the client (psycopg's ClientCursor) and
turns psycopg's automatic preparing off, so PostgreSQL parses and plans every statement
it gets anew. For the queue core's one-statement transitions (jobs/services/fastpath.py)
planning was two thirds of their server time: 1.1 ms of 1.7 ms per call, measured with
pg_stat_statements while `bench queue` drained noop jobs (docs/benchmarks.md). Prepared,
such a statement is planned once per connection and later runs reuse the plan.

Such a statement is planned once per connection, not per call: the connections get
`plan_cache_mode=force_generic_plan` (`with_prepared_statements`), which only prepared
statements heed. PostgreSQL's own choice, a custom plan per call until a generic one
costs no more, kept planning START_SQL every time. The statements it serves are driven
by primary keys given as arrays, whose generic plans are the custom ones.

`prepared_cursor` is Django's cursor around a server-binding psycopg cursor that
prepares every statement it runs: errors arrive as Django's exceptions, and debug
logging and execution wrappers (CaptureQueriesContext) see the statements. psycopg
keeps the prepared statements per connection (at most `prepared_max`, least recently
used dropped) and forgets them on a rollback, so a transaction that fails leaves
nothing behind. Only for fixed SQL: every distinct text is a statement of its own on
the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.utils import CursorWrapper


class _PreparingCursor(psycopg.Cursor[Any]):
    """psycopg's server-binding cursor, preparing whatever it executes."""

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, **kwargs: Any
    ) -> _PreparingCursor:
        super().execute(query, params, prepare=True, **kwargs)
        return self


# libpq's startup option for the connections that run prepared statements.
GENERIC_PLANS = "-c plan_cache_mode=force_generic_plan"


def with_prepared_statements(options: dict[str, Any]) -> dict[str, Any]:
    """Django's connection OPTIONS for prepared statements: psycopg's preparing on (Django
    turns it off; its client-side cursors never prepare regardless) and generic plans."""
    startup = options.get("options", "")
    return {
        **options,
        "prepare_threshold": options.get("prepare_threshold", 5),
        "options": f"{startup} {GENERIC_PLANS}".strip(),
    }


@contextmanager
def prepared_cursor(using: str = DEFAULT_DB_ALIAS) -> Iterator[CursorWrapper]:
    """A cursor of Django's connection whose statements run prepared (see the module)."""
    db = connections[using]
    # What BaseDatabaseWrapper.cursor() does, with our cursor class in place of the
    # connection's cursor factory.
    db.close_if_health_check_failed()
    db.ensure_connection()
    with db.wrap_database_errors:
        cursor = db._prepare_cursor(_PreparingCursor(db.connection))  # type: ignore[attr-defined]
    with cursor:
        yield cursor
