"""What every `manage.py bench` suite shares: its error and the table it prints."""

from __future__ import annotations

from collections.abc import Sequence


class BenchError(RuntimeError):
    """A suite could not measure (a process died, a request failed, work went missing)."""


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns: the first left-aligned (names), the others right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return [line(header), *(line(row) for row in rows)]
