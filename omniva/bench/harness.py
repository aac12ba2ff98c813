"""What every `manage.py bench` suite shares: its error, the database and the folder it
runs in, the environment of the processes it starts, and the table it prints.

The processes themselves are omniva.processes.ManagedProcess, as for `serve` and the
tests: one that exits or never gets ready raises ProcessFailed, which fails a suite as
its own BenchError does (`SuiteFailed`).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omniva.processes import LOOPBACK, ProcessFailed, django_env

HOST = LOOPBACK
BENCH_DATABASE = "omniva_bench"


class BenchError(RuntimeError):
    """A suite could not measure (a process died, a request failed, work went missing)."""


# What makes a suite fail rather than measure: its own error, or a process of it that
# exited or never got ready.
SuiteFailed = (BenchError, ProcessFailed)


def suite_env(database_url: str, **overrides: str) -> dict[str, str]:
    """The environment of a process a suite starts: this one's, on the suite's database."""
    return {**django_env(), "DATABASE_URL": database_url, **overrides}


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns: the first left-aligned (names), the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return [line(header), *(line(row) for row in rows)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


@contextlib.contextmanager
def bench_database(server: Any | None) -> Iterator[str]:
    """The database URL the suite runs in; the Django connection points at it meanwhile.

    With the embedded server (`server`), a database of its own, migrated, dropped at
    the end; with DATABASE_URL, that database.
    """
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    if server is None:
        yield settings.DATABASE_URL
        return
    import psycopg
    from psycopg import sql

    server.ensure_database(BENCH_DATABASE)
    connections.close_all()
    database = connections["default"].settings_dict
    previous = database["NAME"]
    database["NAME"] = BENCH_DATABASE
    try:
        call_command("migrate", interactive=False, verbosity=0)
        yield server.url(BENCH_DATABASE)
    finally:
        connections.close_all()
        database["NAME"] = previous
        with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(BENCH_DATABASE)
                )
            )


@contextlib.contextmanager
def work_folder(suite: str = "queue") -> Iterator[Path]:
    """Stamp files and process logs; kept (and named) only when the suite fails."""
    folder = Path(tempfile.mkdtemp(prefix="omniva-bench-"))
    try:
        yield folder
    except Exception:
        print(f"bench {suite}: process logs kept in {folder}", file=sys.stderr)
        raise
    except BaseException:  # interrupted: nothing to look at
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
