"""The one process harness: the child processes that `manage.py serve`, the benchmarks
(omniva/bench/) and the tests start.

A `ManagedProcess` runs in a process group of its own (so that stopping it reaches what
it forks: qcluster's workers) and dies with its parent; its output goes to a log file
(or the parent's own output). Waits poll a condition, never sleep a fixed time, and
fail fast, with the log's tail, when the process exits first. Stopping sends SIGTERM
to the leader, gives it a grace, then kills whatever is left of its group.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

LOOPBACK = "127.0.0.1"
# How long a process has to stop on SIGTERM before its group is killed.
STOP_GRACE_S = 15.0
POLL_S = 0.1
LOG_TAIL_CHARS = 3000
# How long a killed group's leader has to be reaped.
REAP_S = 5.0

_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class ProcessFailed(RuntimeError):
    """A child exited while it should run, or was not ready in time (its log's tail is
    in the message)."""


def die_with_parent() -> None:
    """In the child, before exec (`preexec_fn`): get SIGTERM when the parent dies, even
    by SIGKILL (Linux's PR_SET_PDEATHSIG; elsewhere nothing happens).

    Linux ties it to the parent *thread*: a child started from a thread that then
    ends gets SIGTERM at once. Start children from a thread that outlives them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# --- what to run ------------------------------------------------------------------------


def django_env(base: Mapping[str, str] | None = None, **overrides: str) -> dict[str, str]:
    """The environment of a Django child: `base` (this process's environment by
    default) with the settings module named, unbuffered output, then `overrides`."""
    env = dict(os.environ if base is None else base)
    env.setdefault("DJANGO_SETTINGS_MODULE", "omniva.settings")
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **overrides}


def manage_argv(*args: str) -> list[str]:
    from django.conf import settings

    return [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), *args]


def qcluster_argv() -> list[str]:
    """`manage.py qcluster`: its queue is the child's Q_CLUSTER_NAME."""
    return manage_argv("qcluster")


def daphne_argv(
    *,
    port: int | None = None,
    fd: int | str | None = None,
    host: str = LOOPBACK,
    options: Sequence[str] = (),
    application: str = "omniva.asgi:application",
) -> list[str]:
    """daphne serving `application` on `host:port`, or on the listening socket `fd`
    that the parent passes down (`serve`'s SO_REUSEPORT sockets)."""
    if (port is None) == (fd is None):
        raise ValueError("daphne listens on a port or on a file descriptor, not both")
    where = ["--fd", str(fd)] if fd is not None else ["--bind", host, "--port", str(port)]
    return [sys.executable, "-m", "daphne", *where, *options, application]


# --- readiness probes -------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def http_status(
    port: int,
    path: str = "/v1/health",
    *,
    host: str = LOOPBACK,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> int | None:
    """One GET on a connection of its own: the status of the answer, None for none."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path, headers=dict(headers or {}))
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def accepts_connections(port: int, *, host: str = LOOPBACK, timeout_s: float = 1.0) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout_s):
        return True
    return False


# --- the process ------------------------------------------------------------------------


class ManagedProcess:
    """One child process (see the module's docstring). `log_path` None: the child
    writes to this process's own output; `stderr_path`: its stderr apart from the log.
    Logs are appended to, unless `truncate_logs` (a log of this start only)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path | None = None,
        stderr_path: Path | None = None,
        name: str = "the process",
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
        stop_grace_s: float = STOP_GRACE_S,
        truncate_logs: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.stderr_path = stderr_path
        self.name = name
        self.cwd = cwd
        self.pass_fds = tuple(pass_fds)
        self.stop_grace_s = stop_grace_s
        self.log_mode = "wb" if truncate_logs else "ab"
        self.popen: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []
        self._terminated = False

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid}>"

    def start(self) -> ManagedProcess:
        if self.popen is not None:
            raise RuntimeError(f"{self.name} was started already")
        if self.cwd is None:
            from django.conf import settings

            self.cwd = Path(settings.BASE_DIR)
        stdout: IO[bytes] | None = None
        stderr: IO[bytes] | int | None = None
        if self.log_path is not None:
            stdout = open(self.log_path, self.log_mode)  # noqa: SIM115 (closed in stop and kill)
            self._files.append(stdout)
            stderr = subprocess.STDOUT
        if self.stderr_path is not None:
            stderr = open(self.stderr_path, self.log_mode)  # noqa: SIM115 (closed in stop and kill)
            self._files.append(stderr)
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=self.pass_fds,
            # Its own group: stopping it reaches every process it forks, and a
            # terminal's Ctrl-C reaches only the parent, which stops it in order.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self._terminated = False
        return self

    # --- state --------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def poll(self) -> int | None:
        """Its exit code, None while it runs (or before it started)."""
        return self.popen.poll() if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        tails = []
        for path in (self.log_path, self.stderr_path):
            with contextlib.suppress(OSError):
                if path is not None:
                    tails.append(path.read_text(errors="replace")[-chars:])
        return "\n".join(tails)

    def check_alive(self) -> None:
        """ProcessFailed, with the log's tail, when it has exited."""
        if self.popen is None:
            raise ProcessFailed(f"{self.name} was not started")
        code = self.popen.poll()
        if code is not None:
            raise ProcessFailed(f"{self.name} exited with code {code}:\n{self.log_tail()}")

    def wait_until(
        self,
        condition: Callable[[], T | None],
        *,
        what: str,
        timeout_s: float,
        interval_s: float = POLL_S,
    ) -> T:
        """Poll `condition` until it returns something true, and return that.
        ProcessFailed when the process exits first ("{name} exited …") or `timeout_s`
        passes ("{name} did not {what} within …"), each with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise ProcessFailed(
                    f"{self.name} did not {what} within {timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(interval_s)

    def wait_answering(
        self,
        port: int,
        path: str = "/v1/health",
        *,
        timeout_s: float,
        host: str = LOOPBACK,
        status: int | None = None,
    ) -> None:
        """Until GET `path` on `host:port` is answered (with `status`, when given)."""

        def answered() -> bool:
            got = http_status(port, path, host=host)
            return got is not None and (status is None or got == status)

        self.wait_until(answered, what=f"answer {path}", timeout_s=timeout_s)

    # --- stopping -----------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM to the leader only, once: qcluster stops its own processes in order,
        and signalling them too makes its sentinel wait for processes already gone."""
        if self.popen is not None and self.popen.poll() is None and not self._terminated:
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            self._terminated = True

    def kill(self) -> int | None:
        """SIGKILL to every process of its group (one whose leader exited too); its
        exit code once reaped."""
        code = None
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.popen.wait(timeout=REAP_S)
        self._close_files()
        return code

    def stop(self, grace_s: float | None = None) -> int | None:
        """terminate(), up to `grace_s` (stop_grace_s) for the leader to exit, then
        kill() what is left of the group; its exit code."""
        if self.popen is not None:
            self.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=self.stop_grace_s if grace_s is None else grace_s)
        return self.kill()

    def _close_files(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []

    def __enter__(self) -> ManagedProcess:
        return self if self.popen is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
