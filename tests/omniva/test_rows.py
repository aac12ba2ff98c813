"""ModelRows builds from fixed SQL the same instances the ORM does, and a pending job read
with its stages, its estimate included, costs one statement."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs import selectors
from jobs import services as job_services
from jobs.api.serializers import JobSerializer
from jobs.models import Job, StageRun
from omniva.rows import ModelRows

pytestmark = pytest.mark.django_db


def _fields(instance: object, model: type) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in model._meta.concrete_fields}


def test_model_rows_loads_what_the_orm_loads_json_columns_included() -> None:
    job, _ = job_services.job_submit(pipeline="fan_out_fan_in", params={"width": 2})
    Job.objects.filter(pk=job.pk).update(
        result={"partial": [1, 2.5, None], "text": "é"}, error={"code": "X"}
    )
    rows = ModelRows(Job)

    (loaded,) = rows.fetch(rows.select("id = %s"), [job.pk])

    assert _fields(loaded, Job) == _fields(Job.objects.get(pk=job.pk), Job)
    assert loaded.params == {"width": 2}
    assert loaded._state.adding is False
    assert loaded._state.db == "default"
    stages = ModelRows(StageRun)
    loaded_stages = stages.fetch(stages.select("job_id = %s", order_by="position, id"), [job.pk])
    assert [_fields(s, StageRun) for s in loaded_stages] == [
        _fields(s, StageRun) for s in StageRun.objects.filter(job=job).order_by("position", "id")
    ]


def test_a_pending_job_with_its_stages_and_estimate_is_read_in_one_statement() -> None:
    done, _ = job_services.job_submit(pipeline="noop")
    now = timezone.now()
    Job.objects.filter(pk=done.pk).update(
        status="completed", started_at=now - timedelta(seconds=2), finished_at=now
    )
    job, _ = job_services.job_submit(pipeline="noop")
    assert selectors.estimated_completion_ms(Job.objects.get(pk=job.pk))  # fills its caches

    with CaptureQueriesContext(connection) as reads:
        read = selectors.job_for_caller(job_id=job.pk, project=None, with_stages=True)
        assert read is not None
        body = JobSerializer(read, context={"with_estimate": True}).data

    assert body["estimated_completion_ms"] is not None
    assert len(reads.captured_queries) == 1, [q["sql"] for q in reads.captured_queries]
