"""Idempotency keys are isolated by project in the service (jobs/services/submit.py), so
REST and gRPC refuse alike: a caller bound to a project gets its own job back for a
known key, and CONFLICT for another project's, which it must not learn of."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from jobs import services
from jobs.models import Job
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Project

pytestmark = pytest.mark.django_db

SUBMITS: dict[str, Callable[..., tuple[Job, bool]]] = {
    "job": lambda **kw: services.job_submit(pipeline="noop", **kw),
    "batch": lambda **kw: services.job_submit_batch(items=[{"pipeline": "noop"}], **kw),
}


@pytest.fixture
def projects() -> tuple[Project, Project]:
    return Project.objects.create(name="ours"), Project.objects.create(name="theirs")


@pytest.mark.parametrize("kind", SUBMITS)
def test_a_bound_caller_gets_its_own_job_back_for_a_known_key(
    kind: str, projects: tuple[Project, Project]
) -> None:
    ours, _ = projects
    submit = SUBMITS[kind]
    first, created = submit(project=ours, idempotency_key="k", bound_project=ours)
    again, created_again = submit(project=ours, idempotency_key="k", bound_project=ours)

    assert (created, created_again) == (True, False)
    assert again.pk == first.pk


@pytest.mark.parametrize("kind", SUBMITS)
def test_a_bound_caller_is_refused_another_projects_key_and_nothing_is_made(
    kind: str, projects: tuple[Project, Project]
) -> None:
    ours, theirs = projects
    submit = SUBMITS[kind]
    submit(project=theirs, idempotency_key="k")
    jobs_before = Job.objects.count()

    with pytest.raises(OmnivaError) as refused:
        submit(project=ours, idempotency_key="k", bound_project=ours)

    assert refused.value.code == ErrorCode.CONFLICT
    assert "theirs" not in refused.value.message
    assert Job.objects.count() == jobs_before


@pytest.mark.parametrize("kind", SUBMITS)
def test_an_unbound_caller_gets_any_projects_job_for_its_key(
    kind: str, projects: tuple[Project, Project]
) -> None:
    _, theirs = projects
    submit = SUBMITS[kind]
    first, _ = submit(project=theirs, idempotency_key="k")

    again: Any
    again, created = submit(idempotency_key="k")

    assert (again.pk, created) == (first.pk, False)
