"""The engine SDK (engines/sdk/) as an engine process outside the server loads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: this test process has Django set up, and other tests have
# registered handlers in its registry already.
LOAD_THE_SDK = """
import json, sys
from engines.sdk import builtin, client, handlers, image_generation, runner
before = handlers.handler_names()
builtin.register_builtin_handlers()
print(json.dumps({
    "before": before,
    "after": handlers.handler_names(),
    "django": sorted(name for name in sys.modules if name.split(".")[0] == "django"),
}))
"""


def test_the_sdk_loads_without_django_and_registers_handlers_only_when_asked() -> None:
    env = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_THE_SDK],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = json.loads(done.stdout)

    assert loaded["before"] == []
    assert loaded["after"] == ["echo", "image_generation", "sleep"]
    assert loaded["django"] == []
