"""Settings come from the environment; a bad value stops start-up with a clear message."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from omniva.settings import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_int_list,
    env_list,
    secret_key_from_file,
)
from tests.conftest import REPO_ROOT


def test_unset_variables_take_their_defaults(monkeypatch) -> None:
    monkeypatch.delenv("OMNIVA_X", raising=False)

    assert env_int("OMNIVA_X", 7) == 7
    assert env_bool("OMNIVA_X", True) is True
    assert env_float("OMNIVA_X", 1.5) == 1.5
    assert env_list("OMNIVA_X", ["a"]) == ["a"]
    assert env_int_list("OMNIVA_X", [30, 60]) == [30, 60]


def test_values_are_parsed(monkeypatch) -> None:
    monkeypatch.setenv("OMNIVA_INT", " 42 ")
    monkeypatch.setenv("OMNIVA_BOOL", "Yes")
    monkeypatch.setenv("OMNIVA_LIST", "a, b,,c")
    monkeypatch.setenv("OMNIVA_INTS", "5,10,20")

    assert env_int("OMNIVA_INT", 0) == 42
    assert env_bool("OMNIVA_BOOL", False) is True
    assert env_list("OMNIVA_LIST", []) == ["a", "b", "c"]
    assert env_int_list("OMNIVA_INTS", []) == [5, 10, 20]


@pytest.mark.parametrize(
    ("value", "call"),
    [
        ("eight", lambda: env_int("OMNIVA_BAD", 1)),
        ("0", lambda: env_int("OMNIVA_BAD", 1, minimum=1)),
        ("70000", lambda: env_int("OMNIVA_BAD", 1, maximum=65535)),
        ("maybe", lambda: env_bool("OMNIVA_BAD", False)),
        ("nan", lambda: env_float("OMNIVA_BAD", 1.0)),
        ("fast", lambda: env_float("OMNIVA_BAD", 1.0)),
        ("30,sixty", lambda: env_int_list("OMNIVA_BAD", [1])),
        ("-1", lambda: env_int_list("OMNIVA_BAD", [1], minimum=0)),
        (",", lambda: env_int_list("OMNIVA_BAD", [1])),
        ("verbose", lambda: env_choice("OMNIVA_BAD", "info", {"info", "debug"})),
    ],
)
def test_bad_values_raise_improperly_configured_naming_the_variable(
    monkeypatch, value, call
) -> None:
    monkeypatch.setenv("OMNIVA_BAD", value)

    with pytest.raises(ImproperlyConfigured, match="OMNIVA_BAD"):
        call()


def test_secret_key_is_generated_once_and_kept_private(tmp_path) -> None:
    path = tmp_path / "var" / "secret_key"

    first = secret_key_from_file(path)
    second = secret_key_from_file(path)

    assert first == second
    assert len(first) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _settings_in_subprocess(tmp_path, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("OMNIVA_", "DATABASE_URL", "PORT"))
    }
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); "
            "from django.conf import settings; print(settings.DEBUG)",
        ],
        cwd=REPO_ROOT,
        env={
            **clean,
            "DJANGO_SETTINGS_MODULE": "omniva.settings",
            "OMNIVA_VAR_DIR": str(tmp_path / "var"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_port_stops_start_up_with_a_clear_message(tmp_path) -> None:
    result = _settings_in_subprocess(tmp_path, PORT="eighty")

    assert result.returncode != 0
    assert "ImproperlyConfigured: PORT must be an integer" in result.stderr


def test_debug_is_off_by_default_and_importing_settings_starts_no_database(tmp_path) -> None:
    result = _settings_in_subprocess(tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert not (tmp_path / "var" / "pg").exists()
    assert (tmp_path / "var" / "secret_key").exists()


def test_database_url_must_name_postgresql(tmp_path) -> None:
    result = _settings_in_subprocess(tmp_path, DATABASE_URL="sqlite:///db.sqlite3")

    assert result.returncode != 0
    assert "DATABASE_URL must name a PostgreSQL server" in result.stderr
