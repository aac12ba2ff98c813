"""Serializers on hot read paths build their fields once per class (FieldsBuiltOnce), and
a job's and a stage's representation is written out: what they render must be what DRF
renders when it builds and runs the fields every time, byte for byte."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework import serializers
from rest_framework.renderers import JSONRenderer

from engines.api.serializers import EventSerializer
from engines.services import event_create, event_type_create
from jobs import selectors
from jobs import services as job_services
from jobs.api.serializers import JobSerializer, StageRunSerializer
from jobs.models import Job
from omniva.api.serializers import FieldsBuiltOnce
from omniva.models import Project

pytestmark = pytest.mark.django_db


def _built_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def generic_job(self: JobSerializer, job: Job) -> dict:
        data = serializers.ModelSerializer.to_representation(self, job)
        if job.is_finished or not self.context.get("with_estimate"):
            data.pop("estimated_completion_ms", None)
        return data

    monkeypatch.setattr(
        FieldsBuiltOnce, "get_fields", lambda self: serializers.ModelSerializer.get_fields(self)
    )
    monkeypatch.setattr(JobSerializer, "to_representation", generic_job)
    monkeypatch.setattr(
        StageRunSerializer, "to_representation", serializers.ModelSerializer.to_representation
    )


def _rendered(data: object) -> bytes:
    return JSONRenderer().render(data)


def _jobs_in_every_shape() -> list[Job]:
    project = Project.objects.create(name="shapes")
    pending, _ = job_services.job_submit(pipeline="fan_out_fan_in", params={"width": 3})
    parent, _ = job_services.job_submit_batch(items=[{"pipeline": "noop"}], project=project)
    jobs = list(Job.objects.prefetch_related("stages").order_by("created_at"))
    assert {pending.pk, parent.pk} <= {job.pk for job in jobs}
    finished = jobs[-1]
    # A finished one, with whole and fractional seconds, a result, an error and a reason.
    finished.status = "failed"
    finished.started_at = timezone.now().replace(microsecond=0)
    finished.finished_at = finished.started_at + timedelta(seconds=1, microseconds=250)
    finished.result = {"partial": [1, 2.5, None]}
    finished.error = {"code": "STAGE_FAILED", "message": "boom"}
    finished.cancel_reason = "operator"
    finished.progress = 100.0
    for run in finished.stages.all():
        run.status, run.attempt, run.worker = "failed", 2, "w-1"
        run.started_at, run.finished_at = finished.started_at, finished.finished_at
        run.error = {"code": "X", "message": "y"}
    return jobs


def test_jobs_with_stages_render_as_drf_builds_and_runs_the_fields(monkeypatch) -> None:
    jobs = _jobs_in_every_shape()
    contexts = [{"with_estimate": True}, {}]
    once = [_rendered(JobSerializer(job, context=c).data) for job in jobs for c in contexts]
    again = [_rendered(JobSerializer(job, context=c).data) for job in jobs for c in contexts]

    _built_every_time(monkeypatch)
    every_time = [_rendered(JobSerializer(job, context=c).data) for job in jobs for c in contexts]

    assert once == again == every_time
    assert sum(b'"stages":[{' in body for body in every_time) >= 4


def test_an_event_renders_as_drf_builds_it(monkeypatch) -> None:
    event = event_create(
        event_type=event_type_create(name="fields-once", engine_type="echo"), data={"m": "hi"}
    )
    once = _rendered(EventSerializer(event).data)

    _built_every_time(monkeypatch)

    assert once == _rendered(EventSerializer(event).data)


def test_serializers_of_one_class_in_many_threads_keep_their_own_fields() -> None:
    # Read with their stages here: the threads render without touching the database.
    submitted = [
        job_services.job_submit(pipeline="fan_out_fan_in", params={"width": n})[0]
        for n in (1, 2, 3, 4)
    ]
    jobs = list(Job.objects.prefetch_related("stages").filter(pk__in=[j.pk for j in submitted]))
    expected = {str(job.pk): _rendered(JobSerializer(job).data) for job in jobs}
    seen: list[bool] = []

    def render(job: Job) -> None:
        for _ in range(50):
            seen.append(_rendered(JobSerializer(job).data) == expected[str(job.pk)])

    threads = [threading.Thread(target=render, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert seen == [True] * 200


def test_a_job_read_with_its_stages_by_the_selector_renders_as_the_prefetched_one() -> None:
    job, _ = job_services.job_submit(pipeline="fan_out_fan_in", params={"width": 4})
    prefetched = Job.objects.prefetch_related("stages").get(pk=job.pk)
    read = selectors.job_for_caller(job_id=str(job.pk), project=None, with_stages=True)

    assert read is not None
    assert _rendered(JobSerializer(read).data) == _rendered(JobSerializer(prefetched).data)
    assert selectors.job_for_caller(job_id="not-a-uuid", project=None, with_stages=True) is None
    other = Project.objects.create(name="elsewhere")
    assert selectors.job_for_caller(job_id=job.pk, project=other, with_stages=True) is None
