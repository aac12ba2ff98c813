"""Engines fixtures: event types and registered engines on the real database; a real
daphne (`daphne`) and `manage.py run_engine` processes (`start_engine`) against it."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engines import services
from engines.models import EngineInstance, EventType
from engines.sdk.client import EngineClient
from omniva import services as omniva_services
from omniva.models import Scope
from omniva.processes import manage_argv
from tests.conftest import ProcessGroup, Server, free_port, start_daphne


@pytest.fixture(autouse=True)
def stop_event_listener() -> Any:
    """Long polls start a LISTEN thread; stop it so no connection outlives the test."""
    yield
    services.listener.stop()


@pytest.fixture
def event_type(db: None) -> EventType:
    return services.event_type_create(name="render", engine_type="actor")


@pytest.fixture
def engine(db: None) -> EngineInstance:
    return services.engine_register(engine_type="actor", name="actor-1")


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
