"""API keys: how they are presented, revoked, scoped and bound to a project."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from omniva import services
from omniva.models import Project, Scope

pytestmark = pytest.mark.django_db


def test_bearer_and_x_api_key_headers_both_authenticate(client, make_key) -> None:
    handle = make_key(Scope.CONTENT)

    bearer = client.get("/v1/projects", HTTP_AUTHORIZATION=f"Bearer {handle.secret}")
    header = client.get("/v1/projects", HTTP_X_API_KEY=handle.secret)

    assert bearer.status_code == 200
    assert header.status_code == 200


def test_missing_key_is_unauthenticated(client) -> None:
    response = client.get("/v1/projects")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    "secret",
    ["omv_000000000000_wrong", "not-even-a-key", "omv_x_y", "omv__", "", "omv_ab\x00c_d"],
)
def test_wrong_key_is_unauthenticated(client, make_key, secret: str) -> None:
    make_key(Scope.CONTENT)

    response = (
        client.get("/v1/projects", HTTP_X_API_KEY=secret)
        if secret
        else client.get("/v1/projects", HTTP_AUTHORIZATION="Bearer ")
    )

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHENTICATED"


def test_right_prefix_with_wrong_secret_is_refused(client, make_key) -> None:
    handle = make_key(Scope.CONTENT)
    forged = handle.secret[:-4] + ("AAAA" if not handle.secret.endswith("AAAA") else "BBBB")

    response = client.get("/v1/projects", HTTP_X_API_KEY=forged)

    assert response.status_code == 401


def test_revoked_key_is_unauthenticated(client, make_key) -> None:
    handle = make_key(Scope.CONTENT)
    services.api_key_revoke(name=handle.key.name)

    response = client.get("/v1/projects", **handle.headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "UNAUTHENTICATED"
    assert "revoked" in response.json()["error"]["message"]


def test_key_without_the_scope_is_permission_denied(client, make_key) -> None:
    handle = make_key(Scope.JOBS_READ)

    listing = client.get("/v1/projects", **handle.headers)
    creating = client.post(
        "/v1/projects", data={"name": "p"}, content_type="application/json", **handle.headers
    )

    assert listing.status_code == 403
    assert listing.json()["error"]["code"] == "PERMISSION_DENIED"
    assert creating.status_code == 403
    assert not Project.objects.exists()


def test_admin_scope_covers_every_scope(client, make_key) -> None:
    handle = make_key(Scope.ADMIN)

    assert client.get("/v1/projects", **handle.headers).status_code == 200
    assert client.get("/v1/audit", **handle.headers).status_code == 200


def test_audit_needs_the_admin_scope(client, make_key) -> None:
    handle = make_key(Scope.CONTENT, Scope.JOBS_READ, Scope.JOBS_WRITE, Scope.ENGINES)

    assert client.get("/v1/audit", **handle.headers).status_code == 403


def test_project_bound_key_sees_only_its_project(client, make_key) -> None:
    mine = services.project_create(name="mine")
    theirs = services.project_create(name="theirs")
    handle = make_key(Scope.CONTENT, project=mine)

    listing = client.get("/v1/projects", **handle.headers).json()
    own = client.get(f"/v1/projects/{mine.pk}", **handle.headers)
    other = client.get(f"/v1/projects/{theirs.pk}", **handle.headers)
    patch_other = client.patch(
        f"/v1/projects/{theirs.pk}",
        data={"name": "stolen"},
        content_type="application/json",
        **handle.headers,
    )

    assert [p["id"] for p in listing["data"]] == [str(mine.pk)]
    assert listing["meta"]["pagination"]["count"] == 1
    assert own.status_code == 200
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "PROJECT_NOT_FOUND"
    assert patch_other.status_code == 404
    theirs.refresh_from_db()
    assert theirs.name == "theirs"


def test_project_bound_key_cannot_create_projects(client, make_key) -> None:
    mine = services.project_create(name="mine")
    handle = make_key(Scope.CONTENT, project=mine)

    response = client.post(
        "/v1/projects", data={"name": "new"}, content_type="application/json", **handle.headers
    )

    assert response.status_code == 403
    assert Project.objects.count() == 1


def test_staff_session_works_without_a_key(client) -> None:
    staff = get_user_model().objects.create_user("ops", password="pw-123456789", is_staff=True)
    client.force_login(staff)

    assert client.get("/v1/projects").status_code == 200


def test_non_staff_session_is_permission_denied(client) -> None:
    user = get_user_model().objects.create_user("viewer", password="pw-123456789")
    client.force_login(user)

    response = client.get("/v1/projects")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "PERMISSION_DENIED"


def test_session_writes_need_a_csrf_token(db) -> None:
    from django.test import Client

    staff = get_user_model().objects.create_user("ops", password="pw-123456789", is_staff=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)

    response = client.post("/v1/projects", data={"name": "p"}, content_type="application/json")

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "PERMISSION_DENIED"
    assert "CSRF" in response.json()["error"]["message"]
    assert not Project.objects.exists()


def test_keys_are_stored_hashed(make_key) -> None:
    handle = make_key(Scope.CONTENT)
    handle.key.refresh_from_db()

    stored = " ".join(str(v) for v in handle.key.__dict__.values())
    assert handle.secret not in stored
    assert handle.secret.split("_", 2)[2] not in stored


def test_health_and_info_need_no_key_but_the_rest_does(client) -> None:
    assert client.get("/v1/health").status_code in {200, 503}
    assert client.get("/v1/info").status_code == 200
    for path in ("/v1/metrics", "/v1/projects", "/v1/audit", "/v1/schema"):
        assert client.get(path).status_code == 401, path
