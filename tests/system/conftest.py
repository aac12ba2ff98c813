"""Fixtures of the process suites: a real daphne (`daphne`) serving the test database and
`manage.py run_engine` processes (`start_engine`) against it; the fake platform of the
publishing tests (`webhook`)."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engines.sdk.client import EngineClient
from omniva import services as omniva_services
from omniva.models import Scope
from omniva.processes import manage_argv
from tests.conftest import ProcessGroup, Server, free_port, start_daphne
from tests.publishing.conftest import webhook

__all__ = ["webhook"]


# --- Real processes: a daphne and `manage.py run_engine` ---------------------------------


@dataclass
class Engine:
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)


@pytest.fixture
def daphne(processes: ProcessGroup, test_database_url: str, tmp_path: Path) -> Server:
    return start_daphne(processes, test_database_url, free_port(), tmp_path / "daphne.log")


@pytest.fixture
def engine_secret(db: None) -> str:
    _, engine_secret = omniva_services.api_key_create(
        name="engine-key", scopes=[Scope.ENGINES, Scope.JOBS_WRITE, Scope.JOBS_READ]
    )
    return engine_secret


@pytest.fixture
def engine_client(daphne: Server, engine_secret: str) -> EngineClient:
    """The client, used here for plain calls to /v1 (it unwraps the envelope)."""
    return EngineClient(daphne.url, engine_secret)


@pytest.fixture
def start_engine(
    processes: ProcessGroup, daphne: Server, engine_secret: str, tmp_path: Path
) -> Any:
    def start(engine_type: str, *args: str) -> Engine:
        log = tmp_path / f"engine-{engine_type}.log"
        child = processes.spawn(
            manage_argv(
                "run_engine",
                "--type", engine_type,
                "--url", daphne.url,
                "--heartbeat-s", "1",
                "--wait-s", "5",
                *args,
            ),
            env={"OMNIVA_ENGINE_KEY": engine_secret},
            log=log,
            name=f"run_engine {engine_type}",
        )  # fmt: skip
        assert child.popen is not None
        engine = Engine(child.popen, log)
        child.wait_until(
            lambda: f"registered {engine_type} engine" in engine.output(),
            what="register",
            timeout_s=30,
        )
        return engine

    return start
