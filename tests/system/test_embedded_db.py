"""The embedded PostgreSQL launcher: start, reuse, adopt, and recover from leftovers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import psycopg
import pytest

from omniva.embedded_db import EmbeddedServer
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def server(scratch_var: Path) -> EmbeddedServer:
    return EmbeddedServer(scratch_var / "pg", server_settings={"fsync": "off"})


def _select_one(server: EmbeddedServer) -> int:
    with psycopg.connect(server.url(), connect_timeout=5) as conn:
        return conn.execute("SELECT 1").fetchone()[0]


def test_start_creates_a_server_with_our_database_on_a_unix_socket(server: EmbeddedServer) -> None:
    assert server.start(owner_pid=os.getpid()) == "started"

    assert _select_one(server) == 1
    assert (server.socket_dir / ".s.PGSQL.5432").is_socket()
    assert server.socket_dir == server.pgdata
    with psycopg.connect(server.url()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == ""


def test_a_running_server_with_a_live_owner_is_reused(server: EmbeddedServer) -> None:
    server.start(owner_pid=os.getpid())
    pid = server.running_pid()

    assert server.start(owner_pid=None) == "reused"
    assert server.running_pid() == pid
    assert server.owned_by(os.getpid())


def test_a_server_whose_owner_died_is_adopted(server: EmbeddedServer) -> None:
    dead_owner = psutil.Popen(["true"])
    dead_owner.wait()
    server.start(owner_pid=dead_owner.pid)
    pid = server.running_pid()

    assert server.start(owner_pid=os.getpid()) == "adopted"
    assert server.running_pid() == pid
    assert server.owned_by(os.getpid())


def test_a_killed_server_leaves_a_stale_pid_file_that_start_handles(server: EmbeddedServer) -> None:
    server.start(owner_pid=os.getpid())
    os.kill(server.running_pid(), signal.SIGKILL)
    wait_for(lambda: not server.is_running(), what="the postmaster to die")
    assert (server.pgdata / "postmaster.pid").exists()

    assert server.start(owner_pid=os.getpid()) == "started"
    assert _select_one(server) == 1


def test_a_pid_file_naming_some_other_live_process_is_stale(server: EmbeddedServer) -> None:
    server.start(owner_pid=os.getpid())
    server.stop()
    # Our own pid is alive but is not a postgres: PostgreSQL itself would refuse to
    # start over such a lock file.
    (server.pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{server.pgdata}\n")

    assert not server.is_running()
    assert server.start(owner_pid=os.getpid()) == "started"
    assert _select_one(server) == 1


def test_stop_stops_the_server_and_forgets_its_owner(server: EmbeddedServer) -> None:
    server.start(owner_pid=os.getpid())
    pid = server.running_pid()

    assert server.stop() is True
    assert server.stop() is False
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert server.owner() is None


def test_a_folder_too_long_for_a_socket_name_gets_a_short_socket_folder(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "pg"
    server = EmbeddedServer(deep)

    assert server.socket_dir != deep
    assert len(str(server.socket_dir / ".s.PGSQL.5432")) < 107
    assert server.django_settings()["HOST"] == str(server.socket_dir)
