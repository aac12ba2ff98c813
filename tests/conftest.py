"""Test infrastructure: a throwaway embedded PostgreSQL per pytest run, real processes.

The run starts its own server under var/test-pg/<pid> with fsync off, points Django's
test database at it, and destroys it at the end. A folder left by a run that was
killed (its pid is gone) is swept at the next start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from django.conf import settings
from django.db import connections

from omniva import services
from omniva.embedded_db import EmbeddedServer
from omniva.models import ApiKey, Project, Scope
from omniva.processes import (
    ManagedProcess,
    daphne_argv,
    django_env,
    manage_argv,
    qcluster_argv,
)
from omniva.processes import free_port as free_port  # the tests import it from here

TEST_SERVER_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
TEST_ROOT = Path(settings.VAR_DIR) / "test-pg"
REPO_ROOT = Path(settings.BASE_DIR)


def _sweep_leftover_servers(root: Path) -> None:
    if not root.exists():
        return
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        if folder.name.isdigit() and psutil.pid_exists(int(folder.name)):
            continue  # another pytest run is using it
        EmbeddedServer(folder).destroy()


LEFTOVER_GRACE_S = 5.0


def _other_client_backends(server: EmbeddedServer) -> list[tuple]:
    import psycopg

    with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, datname, application_name, state FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchall()


@pytest.fixture(scope="session")
def embedded_test_server() -> Iterator[EmbeddedServer]:
    _sweep_leftover_servers(TEST_ROOT)
    server = EmbeddedServer(
        TEST_ROOT / str(os.getpid()), database="postgres", server_settings=TEST_SERVER_SETTINGS
    )
    server.start(owner_pid=os.getpid())
    yield server
    try:
        # A backend leaves pg_stat_activity a moment after its client hung up (the
        # test database's own DROP, a process killed at teardown): give it that moment.
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while (leftovers := _other_client_backends(server)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.destroy()
    assert not leftovers, f"the test run left database connections open: {leftovers}"


@pytest.fixture(scope="session")
def django_db_modify_db_settings(embedded_test_server: EmbeddedServer) -> None:
    """pytest-django's hook to change the database settings before the test DB is made."""
    connections.close_all()
    db = connections["default"].settings_dict
    db.update(embedded_test_server.django_settings(database="omniva"))
    db["TEST"]["NAME"] = "test_omniva"
    # Tests make requests from threads of their own, which end without closing a kept
    # connection: in this process each request's connection closes with it (the
    # processes the tests start keep theirs, as in production).
    db["CONN_MAX_AGE"] = 0


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> None:
    """pytest-django's, then: the retention schedule that a migration makes comes due ten
    minutes after migrate; a test run lasts longer, and a test that fires due schedules
    would run a retention pass it did not ask for. A test of retention makes it due."""
    from datetime import timedelta

    from django.utils import timezone
    from django_q.models import Schedule

    from jobs.services import RETENTION_SCHEDULE

    with django_db_blocker.unblock():
        Schedule.objects.filter(name=RETENTION_SCHEDULE).update(
            next_run=timezone.now() + timedelta(days=365)
        )


@pytest.fixture(scope="session")
def test_database_url(embedded_test_server: EmbeddedServer, django_db_setup: None) -> str:
    """The URL of the migrated test database, for processes the tests start."""
    return embedded_test_server.url("test_omniva")


# --- Keys and clients ----------------------------------------------------------------------


@dataclass
class KeyHandle:
    key: ApiKey
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"HTTP_AUTHORIZATION": f"Bearer {self.secret}"}


@pytest.fixture
def make_key(db: None) -> Callable[..., KeyHandle]:
    counter = iter(range(1_000_000))

    def make(*scopes: str, project: Project | None = None, name: str | None = None) -> KeyHandle:
        key, secret = services.api_key_create(
            name=name or f"key-{next(counter)}",
            scopes=list(scopes) or [Scope.ADMIN],
            project=project,
        )
        return KeyHandle(key, secret)

    return make


@pytest.fixture
def admin_key(make_key: Callable[..., KeyHandle]) -> KeyHandle:
    return make_key(Scope.ADMIN, name="admin-key")


@pytest.fixture
def api(client: Any, admin_key: KeyHandle) -> Any:
    """Django's test client sending the admin key."""
    client.defaults.update(admin_key.headers)
    return client


# --- Real processes --------------------------------------------------------------------------


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 30, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def http_get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 10) -> HttpResult:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResult(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return HttpResult(error.code, dict(error.headers), error.read())


def try_http_get(url: str, **kwargs: Any) -> HttpResult | None:
    try:
        return http_get(url, **kwargs)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def process_env(**overrides: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's, less what points at
    pytest's own database or changes the platform (OMNIVA_*), then `overrides`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST_", "DATABASE_URL", "OMNIVA_"))
    }
    return django_env(env, DJANGO_SETTINGS_MODULE="omniva.settings", **overrides)


class ProcessGroup:
    """Processes a test starts (omniva.processes.ManagedProcess); at teardown each is
    killed with its group, at once (a test's processes need no orderly stop)."""

    def __init__(self, base_env: dict[str, str]) -> None:
        self.base_env = base_env
        self.children: list[ManagedProcess] = []

    def spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        stderr: Path | None = None,
        name: str = "the process",
    ) -> ManagedProcess:
        """Start `argv` (output to `log`, else nowhere; stderr to `stderr` if given).
        A log holds the output of its last start only (a restart begins it anew)."""
        child = ManagedProcess(
            argv,
            env={**self.base_env, **(env or {})},
            log_path=log or Path(os.devnull),
            stderr_path=stderr,
            name=name,
            cwd=REPO_ROOT,
            truncate_logs=True,
        )
        self.children.append(child.start())
        return child

    def start(
        self, argv: list[str], *, env: dict[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """spawn(), for a test that handles the process itself (poll, wait, signals)."""
        popen = self.spawn(argv, env=env, log=log).popen
        assert popen is not None
        return popen

    def manage(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return self.start(manage_argv(*args), **kwargs)

    def stop_all(self) -> None:
        for child in self.children:
            child.kill()


@pytest.fixture
def processes() -> Iterator[ProcessGroup]:
    group = ProcessGroup(process_env())
    yield group
    group.stop_all()


@dataclass
class Server:
    """A daphne process serving the app."""

    url: str
    managed: ManagedProcess
    log: Path

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self.managed.popen is not None
        return self.managed.popen

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_daphne(
    processes: ProcessGroup,
    database_url: str,
    port: int,
    log: Path,
    *,
    env: dict[str, str] | None = None,
) -> Server:
    """daphne serving the app on `database_url`, as `manage.py serve` runs each web
    process (`env`: OMNIVA_* overrides); returns once it answers /v1/health."""
    daphne = processes.spawn(
        daphne_argv(port=port),
        env={"DATABASE_URL": database_url, **(env or {})},
        log=log,
        name="daphne",
    )
    daphne.wait_answering(port, "/v1/health", timeout_s=30)
    return Server(f"http://127.0.0.1:{port}", daphne, log)


def start_worker(
    processes: ProcessGroup, database_url: str, log: Path, **env: str
) -> subprocess.Popen[bytes]:
    """A `qcluster` of the default cluster on `database_url` (env: OMNIVA_* overrides)."""
    worker = processes.spawn(
        qcluster_argv(),
        env={"DATABASE_URL": database_url, "Q_CLUSTER_NAME": "default", **env},
        log=log,
        name="qcluster",
    )
    assert worker.popen is not None
    return worker.popen


def cut_connection(database_url: str) -> None:
    """Terminate the server side of this process's Django connection, as a database
    restart does, and wait until its backend is gone: the next query on it fails."""
    import psycopg

    connections["default"].ensure_connection()
    backend_pid = connections["default"].connection.info.backend_pid
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [backend_pid])
        wait_for(
            lambda: (
                not other.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s", [backend_pid]
                ).fetchone()
            ),
            what="the backend to exit",
        )


# --- Fault counts ----------------------------------------------------------------------------

# What each fault test counted, printed in the run's summary (pytest hides a passing
# test's own output).
FAULT_COUNTS: list[tuple[str, dict[str, int]]] = []


@pytest.fixture(autouse=True)
def health_checks_every_time(settings: Any) -> None:
    """In-process tests read /v1/health right after changing what it reports: no
    report kept from before (tests/omniva/test_health.py tests the keeping)."""
    settings.OMNIVA_HEALTH_CACHE_MS = 0


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """`fault_report(jobs_lost=0, duplicated_effects=0, submitted=...)`: record what a
    fault test counted; the summary at the end of the run lists it."""

    def report(**counts: int) -> None:
        FAULT_COUNTS.append((request.node.nodeid, counts))
        print(format_counts(counts))

    return report


def format_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{name}={value}" for name, value in counts.items())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FAULT_COUNTS:
        return
    terminalreporter.section("what the fault tests counted")
    for nodeid, counts in FAULT_COUNTS:
        terminalreporter.write_line(f"{nodeid.rsplit('::', 1)[-1]}: {format_counts(counts)}")


@pytest.fixture
def scratch_var(tmp_path: Path) -> Iterator[Path]:
    """An OMNIVA_VAR_DIR of its own, short enough for a socket path."""
    folder = Path(settings.VAR_DIR) / "test-var" / f"{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir(parents=True)
    yield folder
    EmbeddedServer(folder / "pg").destroy()
    shutil.rmtree(folder, ignore_errors=True)


# --- Query plans -------------------------------------------------------------------------


def _scans(plan: dict[str, Any], tables: set[str]) -> Iterator[tuple[str, int]]:
    if plan.get("Relation Name") in tables:
        loops = plan.get("Actual Loops", 1)
        seen = plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
        yield plan["Relation Name"], round(seen * loops)
    for child in plan.get("Plans", []):
        yield from _scans(child, tables)


def rows_read_by(queries: list[dict[str, Any]], tables: set[str]) -> list[tuple[str, int, str]]:
    """(table, rows read, statement) of every scan of `tables` in the plans of the
    captured SELECTs, planned as for big tables: tables this small are rightly read
    whole, so sequential scans are turned off to show what an index does."""
    import json

    from django.db import connection

    reads = []
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        for query in queries:
            sql = query["sql"]
            if not sql.lstrip().upper().startswith(("SELECT", "WITH")) or "pg_advisory" in sql:
                continue
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
            plan = cursor.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            reads += [(table, n, sql[:120]) for table, n in _scans(plan[0]["Plan"], tables)]
    return reads
