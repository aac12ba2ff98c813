"""`manage.py serve` (what `make run` runs): the whole platform on one machine.

It starts the embedded database unless DATABASE_URL is set, migrates, creates the
first admin, then supervises the web processes, the gRPC server (`grpcserver`, on
GRPC_PORT) and one `qcluster` per queue. Ctrl-C (SIGINT) or SIGTERM stops every child,
then the database it started.

Web: `serve` binds the port itself, once for each of OMNIVA_WEB_PROCESSES daphne
processes (`daphne --fd`, a socket of its own each, all with SO_REUSEPORT), and the
kernel spreads new connections evenly over them, so HTTP and websockets scale with the
cores on one address. (One socket shared by every process was not even: the process
that woke first accepted a whole burst, and kept-alive connections stayed there; 32 of
wrk's 32 connections landed on one of two processes, run after run.) A web process
that dies is replaced while the others go on serving (unless it keeps dying at start):
its socket is closed at once, so that new connections go to the others until the
replacement listens on a new one.
Any other child that dies takes the rest down with it, so a half-running platform
never pretends to be up.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from omniva import services
from omniva.embedded_db import EmbeddedServer
from omniva.processes import (
    STOP_GRACE_S,
    ManagedProcess,
    accepts_connections,
    daphne_argv,
    http_status,
    manage_argv,
    qcluster_argv,
)

ADMIN_USERNAME = "admin"


# A web process that dies this soon after its start, this many times running, is not
# started again: something is wrong with every start, not with one process.
QUICK_DEATH_S = 10.0
QUICK_DEATHS_TOLERATED = 3


# Where a web child's argv names its listening socket's file descriptor.
FD_PLACEHOLDER = "{fd}"


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: ManagedProcess | None = None
    # A web process: a listening socket of its own, made anew for each start.
    listen: Callable[[], socket.socket] | None = None
    listening: socket.socket | None = None
    restartable: bool = False
    started_at: float = 0.0
    quick_deaths: int = 0

    def start(self) -> None:
        argv = self.argv
        pass_fds: tuple[int, ...] = ()
        if self.listen is not None:
            # A dead process's socket would keep its share of new connections waiting
            # in its backlog until a replacement accepts them: it goes (what waits in
            # it is reset, never half-served) and the replacement gets a new one.
            self.close_socket()
            self.listening = self.listen()
            fd = self.listening.fileno()
            argv = [str(fd) if arg == FD_PLACEHOLDER else arg for arg in argv]
            pass_fds = (fd,)
        # Its output is serve's own (no log file).
        self.started_at = time.monotonic()
        self.process = ManagedProcess(argv, env=self.env, name=self.name, pass_fds=pass_fds).start()

    def close_socket(self) -> None:
        if self.listening is not None:
            self.listening.close()
            self.listening = None

    def note_death(self) -> bool:
        """Count a death; False when it keeps dying at start and must stay down."""
        if time.monotonic() - self.started_at < QUICK_DEATH_S:
            self.quick_deaths += 1
        else:
            self.quick_deaths = 0
        return self.quick_deaths < QUICK_DEATHS_TOLERATED

    def exit_code(self) -> int | None:
        return self.process.poll() if self.process is not None else None


class Command(BaseCommand):
    help = (
        "Run Omniva: database, migrations, the web processes, the gRPC server and one "
        "django-q2 cluster per queue."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.HOST)
        parser.add_argument("--port", type=int, default=settings.PORT)
        parser.add_argument(
            "--grpc-port",
            type=int,
            default=settings.GRPC_PORT,
            help="Port of the gRPC OrchestratorService (0: do not start it).",
        )
        parser.add_argument(
            "--no-migrate",
            action="store_true",
            help="Do not apply migrations (a web node of a cluster: migrate once per release).",
        )
        parser.add_argument(
            "--web-processes",
            type=int,
            default=settings.OMNIVA_WEB_PROCESSES,
            help="Web (daphne) processes sharing the port (OMNIVA_WEB_PROCESSES).",
        )
        parser.add_argument(
            "--queues",
            default=",".join(settings.OMNIVA_QUEUES),
            help="Queues to start a worker cluster for (comma-separated; empty for none).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self._stop_requested = threading.Event()
        self._web_processes = options["web_processes"]
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)

        database = self._start_database()
        children: list[Child] = []
        exit_code = 0
        try:
            if not options["no_migrate"]:
                self._say("Applying migrations…")
                call_command("migrate", interactive=False, verbosity=0)
            self._announce_admin()
            connections.close_all()

            self._check_port_free(options["host"], options["port"])
            children = self._children(options)
            for child in children:
                child.start()
            ports = [options["port"]] + ([options["grpc_port"]] if options["grpc_port"] else [])
            if self._wait_until_listening(options["host"], ports, children):
                host = self._display_host(options["host"])
                base = f"http://{host}:{options['port']}"
                grpc = f" · gRPC {host}:{options['grpc_port']}" if options["grpc_port"] else ""
                self._say(
                    f"Omniva is up: {base}/v1/health · admin {base}/admin/{grpc} · Ctrl-C stops it."
                )
            exit_code = self._supervise(children)
        finally:
            self._stop_children(children)
            for child in children:
                child.close_socket()
            connections.close_all()
            if database is not None and database.owned_by(os.getpid()):
                self._say("Stopping the embedded database…")
                database.stop()
            self._say("Stopped.")
        if exit_code:
            sys.exit(exit_code)

    # --- steps ------------------------------------------------------------------------------

    def _start_database(self) -> EmbeddedServer | None:
        if settings.DATABASE_URL:
            self._say("Database: external (DATABASE_URL).")
            return None
        server = EmbeddedServer(
            settings.VAR_DIR / "pg", database=settings.DATABASES["default"]["NAME"]
        )
        outcome = server.start(owner_pid=os.getpid())
        described = {
            "started": "started",
            "reused": "already running (left running by `manage.py db start` or another serve)",
            "adopted": "left running by a run that was killed; taken over",
        }[outcome]
        self._say(f"Database: embedded PostgreSQL in {server.pgdata}, {described}.")
        return server

    def _announce_admin(self) -> None:
        password_file = settings.VAR_DIR / "admin-password"
        password = services.admin_user_ensure(username=ADMIN_USERNAME, password_file=password_file)
        if password:
            self._say(
                f"Created the admin user {ADMIN_USERNAME!r}; its password is in {password_file} "
                "(log in at /admin/, then change it)."
            )

    @staticmethod
    def _address(host: str, port: int) -> tuple[int, int, int, Any]:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return family, kind, proto, address

    def _check_port_free(self, host: str, port: int) -> None:
        """Bound once without SO_REUSEPORT first: the web sockets would share the port
        with anyone else's SO_REUSEPORT socket on it (a second `serve` of the same
        user), and must not."""
        family, kind, proto, address = self._address(host, port)
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise CommandError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None

    def _listen(self, host: str, port: int) -> socket.socket:
        """A listening socket on the web port, for one web process (SO_REUSEPORT: the
        kernel spreads new connections over every such socket on the port)."""
        family, kind, proto, address = self._address(host, port)
        listening = socket.socket(family, kind, proto)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            listening.bind(address)
        except OSError as exc:
            listening.close()
            raise CommandError(f"Cannot listen on {host}:{port}: {exc.strerror}.") from None
        listening.listen(socket.SOMAXCONN)
        listening.set_inheritable(True)
        return listening

    def _children(self, options: dict[str, Any]) -> list[Child]:
        env = dict(os.environ)
        env.setdefault("DJANGO_SETTINGS_MODULE", "omniva.settings")
        children = [
            Child(
                f"web:{number}",
                # No access log: daphne formats each entry even for /dev/null (7% of
                # its own work per request); errors still reach the log.
                daphne_argv(fd=FD_PLACEHOLDER, options=["-v", "0"]),
                env,
                listen=partial(self._listen, options["host"], options["port"]),
                restartable=True,
            )
            for number in range(1, max(1, self._web_processes) + 1)
        ]
        if options["grpc_port"]:
            children.append(
                Child(
                    "grpc",
                    manage_argv(
                        "grpcserver", "--host", options["host"], "--port", str(options["grpc_port"])
                    ),
                    env,
                )
            )
        for queue in filter(None, (q.strip() for q in options["queues"].split(","))):
            children.append(
                Child(
                    f"worker:{queue}",
                    qcluster_argv(),
                    {**env, "Q_CLUSTER_NAME": queue},
                )
            )
        return children

    def _wait_until_listening(self, host: str, ports: list[int], children: list[Child]) -> bool:
        connect_host = "127.0.0.1" if host in {"0.0.0.0", ""} else host  # noqa: S104
        if connect_host == "::":
            connect_host = "::1"
        waiting = list(ports)
        while not self._stop_requested.is_set():
            if any(child.exit_code() is not None for child in children):
                return False
            for port in list(waiting):
                if self._answers(connect_host, port, http=port == ports[0]):
                    waiting.remove(port)
            if not waiting:
                return True
            self._stop_requested.wait(0.1)
        return False

    @staticmethod
    def _answers(host: str, port: int, *, http: bool) -> bool:
        # The web port is bound by `serve` itself and accepts before any web process is
        # ready; it is up when a web process answers.
        if not http:
            return accepts_connections(port, host=host, timeout_s=0.5)
        # /health: no key, no audit row.
        return http_status(port, "/health", host=host, timeout_s=1) is not None

    def _supervise(self, children: list[Child]) -> int:
        while not self._stop_requested.wait(0.2):
            for child in children:
                code = child.exit_code()
                if code is None:
                    continue
                child.close_socket()
                if child.restartable and child.note_death():
                    self._say(f"{child.name} exited with code {code}; starting it again.")
                    child.start()
                    continue
                self._say(f"{child.name} exited with code {code}; stopping everything.")
                return 1
        return 0

    def _stop_children(self, children: list[Child]) -> None:
        running = [c for c in children if c.process is not None and c.process.running]
        if not running:
            return
        self._say("Stopping " + ", ".join(c.name for c in running) + "…")
        # Every leader is told at once, then each has what is left of one shared grace:
        # stopping them one after the other would add up their graces.
        for child in running:
            assert child.process is not None
            child.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        # stop() does not signal a leader twice, and kills whatever is left of each
        # group (a child that ignored SIGTERM, or a worker whose parent already exited).
        for child in children:
            if child.process is not None:
                child.process.stop(grace_s=max(0.1, deadline - time.monotonic()))

    # --- helpers ----------------------------------------------------------------------------

    def _request_stop(self, signum: int, frame: Any) -> None:
        self._stop_requested.set()

    def _say(self, message: str) -> None:
        self.stdout.write(f"[omniva] {message}")
        self.stdout.flush()

    @staticmethod
    def _display_host(host: str) -> str:
        return "localhost" if host in {"0.0.0.0", "127.0.0.1", "::", ""} else host  # noqa: S104
