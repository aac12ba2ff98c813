from __future__ import annotations

import pytest

from omniva import services

pytestmark = pytest.mark.django_db


def test_lists_report_pagination_in_meta(api) -> None:
    for index in range(5):
        services.project_create(name=f"p{index}")

    body = api.get("/v1/projects", {"limit": 2, "offset": 1}).json()

    assert [p["name"] for p in body["data"]] == ["p1", "p2"]
    page = body["meta"]["pagination"]
    assert (page["limit"], page["offset"], page["count"]) == (2, 1, 5)
    assert "offset=3" in page["next"]
    assert page["previous"] is not None


def test_default_limit_is_50(api) -> None:
    assert api.get("/v1/projects").json()["meta"]["pagination"]["limit"] == 50


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 501}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": -1}, "offset"),
        ({"offset": "9" * 40}, "offset"),
    ],
)
def test_out_of_range_paging_is_a_validation_error(api, params: dict, field: str) -> None:
    response = api.get("/v1/projects", params)

    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert field in body["error"]["details"]
