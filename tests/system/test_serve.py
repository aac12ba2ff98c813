"""`manage.py serve` (what `make run` runs), as real processes: database, daphne, workers."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import psutil
import pytest

from omniva.embedded_db import EmbeddedServer
from tests.conftest import ProcessGroup, free_port, try_http_get, wait_for

pytestmark = pytest.mark.slow


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait for every process of `pids` to exit; on failure, name the ones still running."""
    try:
        wait_for(lambda: all(_gone(pid) for pid in pids), timeout=timeout, what="exits")
    except AssertionError:
        survivors = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                if not _gone(pid):
                    process = psutil.Process(pid)
                    survivors.append(f"{pid} {process.status()} {' '.join(process.cmdline())}")
        raise AssertionError(f"still running after {timeout} s: {survivors}") from None


class Serve:
    def __init__(self, processes: ProcessGroup, var: Path, log: Path) -> None:
        self.port = free_port()
        self.var = var
        self.log = log
        self.process = processes.manage(
            "serve",
            "--port",
            str(self.port),
            "--grpc-port",
            str(free_port()),
            env={"OMNIVA_VAR_DIR": str(var), "OMNIVA_WORKERS": "1"},
            log=log,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def health(self):
        return try_http_get(f"{self.url}/v1/health", timeout=5)

    def wait_healthy(self, *, clusters: int = 1) -> dict:
        def healthy():
            assert self.process.poll() is None, self.output()
            result = self.health()
            if not (result and result.status == 200):
                return None
            data = result.json()["data"]
            reported = len(data["checks"]["workers"].get("clusters", []))
            return data["status"] == "healthy" and reported >= clusters and result

        return wait_for(healthy, timeout=90, interval=0.2, what="serve to report healthy").json()

    def descendants(self) -> list[int]:
        return [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]

    def database(self) -> EmbeddedServer:
        return EmbeddedServer(self.var / "pg")


def test_serve_answers_health_and_ctrl_c_leaves_no_process(
    processes, scratch_var, tmp_path
) -> None:
    serve = Serve(processes, scratch_var, tmp_path / "serve.log")

    body = serve.wait_healthy(clusters=2)
    children = serve.descendants()
    postmaster = serve.database().running_pid()
    serve.process.send_signal(signal.SIGINT)
    code = serve.process.wait(timeout=60)

    assert body["status"] == "success"
    assert body["data"]["checks"]["database"]["status"] == "ok"
    assert len(body["data"]["checks"]["workers"]["clusters"]) == 2  # default and gpu
    assert code == 0, serve.output()
    assert len(children) >= 3  # daphne, two qclusters (and their workers)
    assert postmaster is not None
    leftovers = [pid for pid in [*children, postmaster] if not _gone(pid)]
    assert leftovers == [], serve.output()
    assert (scratch_var / "admin-password").exists()
    assert "admin-password" in serve.output()
    assert "admin" in (scratch_var / "admin-password").read_text()


def test_health_is_unhealthy_while_the_database_is_down_then_recovers(
    processes, scratch_var, tmp_path
) -> None:
    serve = Serve(processes, scratch_var, tmp_path / "serve.log")
    serve.wait_healthy()
    database = serve.database()

    database.stop(mode="immediate")
    down = wait_for(
        lambda: (r := serve.health()) and r.status == 503 and r,
        timeout=30,
        what="a 503 from /v1/health",
    )
    database.start(owner_pid=serve.process.pid)
    recovered = serve.wait_healthy()

    body = down.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert body["data"]["status"] == "unhealthy"
    assert body["data"]["checks"]["database"]["status"] == "failed"
    assert recovered["data"]["checks"]["database"]["status"] == "ok"
    assert serve.process.poll() is None, serve.output()


def test_a_killed_serve_takes_its_children_along_and_the_next_one_adopts_the_database(
    processes, scratch_var, tmp_path
) -> None:
    first = Serve(processes, scratch_var, tmp_path / "first.log")
    # Both clusters up: a qcluster SIGTERMed while django-q2 still spawns its processes
    # can leave them behind (seen once under load; left for issue 10's fault tests).
    first.wait_healthy(clusters=2)
    children = first.descendants()
    postmaster = first.database().running_pid()

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    _wait_gone(children, timeout=30)
    assert first.database().running_pid() == postmaster  # the server outlives its owner

    second = Serve(processes, scratch_var, tmp_path / "second.log")
    second.wait_healthy()
    assert "taken over" in second.output()
    assert second.database().running_pid() == postmaster
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=60) == 0
    assert _gone(postmaster)
