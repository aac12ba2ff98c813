"""Engines fixtures: event types and registered engines on the real database (a real
daphne and `manage.py run_engine` processes are in tests/system/conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from engines import services
from engines.models import EngineInstance, EventType


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
