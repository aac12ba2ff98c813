"""`manage.py apikey create|list|revoke`."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from omniva import services
from omniva.models import ApiKey

pytestmark = pytest.mark.django_db


def _run(*args: str) -> list[str]:
    out = StringIO()
    call_command("apikey", *args, stdout=out)
    return out.getvalue().strip().splitlines()


def test_create_prints_a_working_key_on_its_last_line(client) -> None:
    lines = _run("create", "ci", "--scope", "content", "--scope", "jobs:read")

    secret = lines[-1]
    assert secret.startswith("omv_")
    assert ApiKey.objects.get(name="ci").scopes == ["content", "jobs:read"]
    assert client.get("/v1/projects", HTTP_X_API_KEY=secret).status_code == 200


def test_create_without_scope_makes_an_admin_key() -> None:
    _run("create", "root")

    assert ApiKey.objects.get(name="root").scopes == ["admin"]


def test_create_binds_a_key_to_a_project(client) -> None:
    project = services.project_create(name="bound")
    other = services.project_create(name="other")

    secret = _run("create", "tenant", "--scope", "content", "--project", str(project.pk))[-1]

    listing = client.get("/v1/projects", HTTP_X_API_KEY=secret).json()["data"]
    assert [p["name"] for p in listing] == ["bound"]
    assert client.get(f"/v1/projects/{other.pk}", HTTP_X_API_KEY=secret).status_code == 404


def test_create_refuses_an_unknown_project_and_a_duplicate_name() -> None:
    with pytest.raises(CommandError, match="No project"):
        _run("create", "x", "--project", "not-a-uuid")
    _run("create", "dup")
    with pytest.raises(CommandError, match="already exists"):
        _run("create", "dup")
    assert ApiKey.objects.count() == 1


def test_list_shows_keys_without_secrets() -> None:
    secret = _run("create", "listed", "--scope", "engines")[-1]

    output = "\n".join(_run("list"))

    assert "listed" in output
    assert "engines" in output
    assert secret not in output


def test_revoke_stops_the_key_from_working(client) -> None:
    secret = _run("create", "gone")[-1]

    _run("revoke", "gone")

    assert client.get("/v1/projects", HTTP_X_API_KEY=secret).status_code == 401
    with pytest.raises(CommandError, match="No key"):
        _run("revoke", "never-existed")
