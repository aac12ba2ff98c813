"""Serializers on hot read paths build their fields once per class (FieldsBuiltOnce):
what they render must be what DRF renders when it builds the fields every time."""

from __future__ import annotations

import threading

import pytest
from rest_framework import serializers

from engines.api.serializers import EventSerializer
from engines.services import event_create, event_type_create
from jobs import services as job_services
from jobs.api.serializers import JobSerializer
from jobs.models import Job
from omniva.api.serializers import FieldsBuiltOnce

pytestmark = pytest.mark.django_db


def _built_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        FieldsBuiltOnce, "get_fields", lambda self: serializers.ModelSerializer.get_fields(self)
    )


def test_a_job_with_stages_renders_as_drf_builds_it(monkeypatch) -> None:
    job, _ = job_services.job_submit(pipeline="fan_out_fan_in", params={"width": 3})
    job = Job.objects.prefetch_related("stages").get(pk=job.pk)
    once = [JobSerializer(job, context={"with_estimate": True}).data for _ in range(2)]

    _built_every_time(monkeypatch)
    every_time = JobSerializer(job, context={"with_estimate": True}).data

    assert once[0] == once[1] == every_time
    assert len(every_time["stages"]) >= 3


def test_an_event_renders_as_drf_builds_it(monkeypatch) -> None:
    event = event_create(
        event_type=event_type_create(name="fields-once", engine_type="echo"), data={"m": "hi"}
    )
    once = EventSerializer(event).data

    _built_every_time(monkeypatch)

    assert once == EventSerializer(event).data


def test_serializers_of_one_class_in_many_threads_keep_their_own_fields() -> None:
    # Read with their stages here: the threads render without touching the database.
    submitted = [
        job_services.job_submit(pipeline="fan_out_fan_in", params={"width": n})[0]
        for n in (1, 2, 3, 4)
    ]
    jobs = list(Job.objects.prefetch_related("stages").filter(pk__in=[j.pk for j in submitted]))
    expected = {str(job.pk): JobSerializer(job).data for job in jobs}
    seen: list[bool] = []

    def render(job: Job) -> None:
        for _ in range(50):
            seen.append(JobSerializer(job).data == expected[str(job.pk)])

    threads = [threading.Thread(target=render, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert seen == [True] * 200
