"""The reference app of `bench web` (omniva/bench/reference/) answers its one view."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings

from omniva.bench.reference import settings as reference_settings
from omniva.bench.reference.urls import PATH


@pytest.mark.django_db
@override_settings(ROOT_URLCONF="omniva.bench.reference.urls", MIDDLEWARE=[])
def test_reference_view_runs_its_query_and_answers_json() -> None:
    response = Client().get(PATH)
    assert response.status_code == 200
    assert response.json() == {"ok": True}


def test_reference_keeps_its_connections() -> None:
    database = reference_settings.DATABASES["default"]
    assert database["ENGINE"] == "django.db.backends.postgresql"
    assert database["CONN_MAX_AGE"] > 0
    assert "pool" not in database["OPTIONS"]
