"""What every `manage.py bench` suite shares: its error and the table it prints."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from omniva.processes import die_with_parent

# How long a suite's process has to stop on SIGTERM before its group is killed.
STOP_GRACE_S = 15.0


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


class SuiteProcess:
    """A process a suite starts (daphne, a qcluster): in its own process group, dying
    with its parent, its output appended to `log_path`. Subclasses declare the
    `log_path`, `process` and `_log` fields."""

    log_path: Path
    process: subprocess.Popen[bytes] | None
    _log: IO[bytes] | None
    # How errors name it ("the server"); a class attribute, not a dataclass field.
    title = "the process"

    def spawn(self, argv: list[str], env: dict[str, str]) -> None:
        from django.conf import settings

        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=settings.BASE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(
                f"{self.title} exited with code {self.process.returncode}:\n" + self.log_tail()
            )

    def wait_until(self, ready: Callable[[], bool], *, what: str, timeout_s: float) -> None:
        """Poll `ready` until it is true; BenchError if the process exits first or
        `timeout_s` passes ("{title} did not {what} within …")."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.title} did not {what} within {timeout_s:.0f} s:\n" + self.log_tail()
                )
            time.sleep(0.2)

    def stop(self) -> None:
        process = self.process
        if process is not None:
            if process.poll() is None:
                # Only the leader: qcluster stops its own processes in order.
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_GRACE_S)
            # Whatever is left in its group (a worker whose parent already exited).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
