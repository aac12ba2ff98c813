"""`manage.py check --deploy` with the production settings a deployment sets by
environment (issue 10): clean, and not clean without them (so the check is real)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

PRODUCTION_ENV = {
    "DEBUG": "0",
    "ALLOWED_HOSTS": "omniva.example.com",
    "OMNIVA_SECURE_COOKIES": "1",
    "OMNIVA_SSL_REDIRECT": "1",
    "OMNIVA_HSTS_SECONDS": "31536000",
    "OMNIVA_HSTS_INCLUDE_SUBDOMAINS": "1",
    "OMNIVA_HSTS_PRELOAD": "1",
    "OMNIVA_BEHIND_TLS_PROXY": "1",
}


def check_deploy(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTEST_", "OMNIVA_", "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS"))
    }
    env.update(DJANGO_SETTINGS_MODULE="omniva.settings", **extra)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "manage.py"), "check", "--deploy", "--fail-level",
         "WARNING"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_check_deploy_is_clean_with_production_settings() -> None:
    result = check_deploy({**PRODUCTION_ENV, "SECRET_KEY": secrets.token_urlsafe(60)})

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_names_what_is_missing_without_them() -> None:
    result = check_deploy({"DEBUG": "1", "SECRET_KEY": "short"})

    assert result.returncode != 0
    for warning in ("W004", "W008", "W009", "W012", "W016", "W018"):
        assert f"security.{warning}" in result.stderr + result.stdout, warning
