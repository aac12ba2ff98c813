"""The lists' FilterSets (omniva/api/filters.py) apply what the filter serializers
validated; should the two ever disagree, the caller gets a 400 naming the parameter,
never a 500 and never a list widened by a dropped filter."""

from __future__ import annotations

import pytest

from jobs.models import Job
from jobs.selectors import JobFilter
from omniva.errors import ErrorCode, OmnivaError

pytestmark = pytest.mark.django_db


def test_a_value_the_filterset_refuses_is_a_validation_error_naming_it() -> None:
    with pytest.raises(OmnivaError) as refused:
        JobFilter.apply(Job.objects.all(), {"status": ["no_such_status"]})

    assert refused.value.code == ErrorCode.VALIDATION_ERROR
    assert set(refused.value.details or {}) == {"status"}


def test_validated_values_narrow_the_list() -> None:
    Job.objects.create(pipeline="noop", status="completed")
    Job.objects.create(pipeline="noop", status="failed")

    narrowed = JobFilter.apply(Job.objects.all(), {"status": {"failed"}})

    assert [job.status for job in narrowed] == ["failed"]
