"""The admin: API keys can be revoked there; the audit trail is searchable and read-only."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

from omniva.models import ApiKey, AuditRecord, Scope

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    user = get_user_model().objects.create_superuser("root", password="pw-123456789")
    client.force_login(user)
    return client


def test_audit_records_are_searchable_by_request_id(staff_client) -> None:
    staff_client.get("/v1/info", HTTP_X_REQUEST_ID="needle-123")
    staff_client.get("/v1/info", HTTP_X_REQUEST_ID="hay-456")

    page = staff_client.get("/admin/omniva/auditrecord/", {"q": "needle-123"}).content.decode()

    assert "needle-123" in page
    assert "hay-456" not in page


def test_audit_records_cannot_be_added_changed_or_deleted(staff_client) -> None:
    staff_client.get("/v1/info", HTTP_X_REQUEST_ID="keep-me")
    record = AuditRecord.objects.get(request_id="keep-me")

    assert staff_client.get("/admin/omniva/auditrecord/add/").status_code == 403
    staff_client.post(f"/admin/omniva/auditrecord/{record.pk}/change/", {"status": 500})
    staff_client.post(f"/admin/omniva/auditrecord/{record.pk}/delete/", {"post": "yes"})

    record.refresh_from_db()
    assert record.status == 200


def test_revoke_action_revokes_keys(staff_client, make_key) -> None:
    handle = make_key(Scope.CONTENT)

    staff_client.post(
        "/admin/omniva/apikey/",
        {"action": "revoke", "_selected_action": [handle.key.pk]},
    )

    assert ApiKey.objects.get(pk=handle.key.pk).revoked_at is not None
    staff_client.logout()
    assert staff_client.get("/v1/projects", **handle.headers).status_code == 401


def test_admin_pages_render_with_their_styles(staff_client) -> None:
    page = staff_client.get("/admin/")
    css = staff_client.get("/static/admin/css/base.css")

    assert page.status_code == 200
    assert css.status_code == 200


def test_a_clip_added_and_retitled_in_the_admin_queues_its_embedding(staff_client) -> None:
    from jobs.models import Job
    from omniva.models import Clip, Project

    project = Project.objects.create(name="admin-clips")
    form = {"project": str(project.pk), "title": "First", "status": "ingested", "analysis": "{}"}
    added = staff_client.post("/admin/omniva/clip/add/", form)
    assert added.status_code == 302, added.content[:2000]
    clip = Clip.objects.get()
    changed = staff_client.post(
        f"/admin/omniva/clip/{clip.pk}/change/", {**form, "title": "Second"}
    )
    assert changed.status_code == 302
    clip.refresh_from_db()
    assert clip.title == "Second"
    assert [j.params for j in Job.objects.filter(pipeline="clip_embed")] == [
        {"clip_id": str(clip.pk)}
    ] * 2
    staff_client.post(f"/admin/omniva/clip/{clip.pk}/delete/", {"post": "yes"})
    assert not Clip.objects.exists()
