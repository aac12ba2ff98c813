"""Every transition of a job or stage writes its activity row in its own transaction."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from django.core.serializers.json import DjangoJSONEncoder

from jobs import services
from jobs.models import Job
from jobs.services import activity
from omniva.errors import OmnivaError
from omniva.models import ACTIVITY_CHANNEL, Activity, Project
from omniva.notifications import own_connection_params
from tests.jobs.conftest import claim_one, run_delivery

pytestmark = pytest.mark.django_db


def kinds_of(job: Job) -> list[tuple[str, str | None]]:
    rows = Activity.objects.filter(job_id=job.pk).order_by("id")
    return [(row.kind, row.data.get("status")) for row in rows]


def test_a_one_stage_jobs_life_is_in_the_stream_in_order() -> None:
    job, _ = services.job_submit(pipeline="noop")
    ack_id, task = claim_one("default")
    run_delivery(ack_id, task)
    assert kinds_of(job) == [
        ("job:update", "pending"),
        ("stage:update", "queued"),
        ("job:update", "running"),
        ("stage:update", "running"),
        ("stage:update", "completed"),
        ("job:update", "completed"),
    ]


def as_stored(payload: dict[str, Any]) -> dict[str, Any]:
    """A payload as the outbox stores it and a client reads it (JSON)."""
    return json.loads(json.dumps(payload, cls=DjangoJSONEncoder))


def test_the_one_statement_transitions_write_what_the_python_ones_would() -> None:
    """The SQL of the one-statement start and completion builds each payload from the
    same field list as the Python transitions: for the rows as they then stood, the
    same fields with the same values in the same formats."""
    job, _ = services.job_submit(pipeline="noop")
    run = job.stages.get()
    ack_id, _task = claim_one("default")
    started = services.stages_start_granted(ack_ids={run.pk: ack_id}, worker="w")
    assert [claim.stage_run_id for claim in started] == [run.pk]
    start_job, start_stage = Activity.objects.filter(job_id=job.pk).order_by("-id")[:2][::-1]
    job.refresh_from_db()
    run.refresh_from_db()
    assert start_job.data == as_stored(activity._job_summary(job))
    assert start_stage.data == as_stored(activity._stage_summary(run))

    done = services.stages_complete_sole(
        [services.Completion(stage_run_id=run.pk, token=started[0].token, output={})]
    )
    assert done == {run.pk}
    end_stage, end_job = Activity.objects.filter(job_id=job.pk).order_by("-id")[:2][::-1]
    job.refresh_from_db()
    run.refresh_from_db()
    assert end_job.data == as_stored(activity._job_summary(job))
    assert end_stage.data == as_stored(activity._stage_summary(run))
    assert end_job.data["updated_at"].endswith("Z")


def test_a_dag_retry_and_its_logs_are_in_the_stream(drain: Any, due: Any) -> None:
    job, _ = services.job_submit(pipeline="fail_n_times", params={"n": 1})
    drain()
    assert ("job:update", "retrying") in kinds_of(job)
    log = Activity.objects.filter(job_id=job.pk, kind="log").get()
    assert "retry in" in log.data["message"]
    assert log.data["level"] == "warning"
    due(job)
    drain()
    assert kinds_of(job)[-1] == ("job:update", "completed")


def test_progress_reports_are_job_progress_events() -> None:
    job, _ = services.job_submit(pipeline="sleep", params={"seconds": 5})
    run = job.stages.get()
    claim = services.stage_start(stage_run_id=run.pk, worker="test")
    assert claim is not None
    services.stage_report(stage_run_id=run.pk, token=claim.token, progress=40, message="halfway")
    progress = Activity.objects.filter(job_id=job.pk, kind="job:progress").get()
    assert progress.data["progress"] == 40.0
    stage = Activity.objects.filter(job_id=job.pk, kind="stage:update").order_by("id").last()
    assert (stage.data["status"], stage.data["progress"]) == ("running", 40.0)
    assert Activity.objects.filter(job_id=job.pk, kind="log").get().data["message"] == "halfway"


def test_a_refused_transition_writes_nothing() -> None:
    job, _ = services.job_submit(pipeline="noop")
    run = job.stages.get()
    services.stage_start(stage_run_id=run.pk, worker="test")
    before = Activity.objects.count()
    with pytest.raises(OmnivaError):
        services.stage_complete(stage_run_id=run.pk, token="0" * 32, output={})
    assert Activity.objects.count() == before


def test_rows_carry_the_jobs_project_for_scoping() -> None:
    project = Project.objects.create(name="p")
    job, _ = services.job_submit(pipeline="noop", project=project)
    run_delivery(*claim_one("default"))
    assert set(Activity.objects.filter(job_id=job.pk).values_list("project_id", flat=True)) == {
        project.pk
    }


def test_cancel_and_delete_are_in_the_stream() -> None:
    job, _ = services.job_submit(pipeline="noop")
    services.job_cancel(job_id=job.pk, reason="no")
    services.job_delete(job_id=job.pk)
    kinds = [kind for kind, _ in kinds_of(job)]
    assert ("job:update", "cancelled") in kinds_of(job)
    assert kinds[-1] == "job:deleted"


@pytest.mark.django_db(transaction=True)
def test_a_committed_transition_notifies_the_activity_channel() -> None:
    with psycopg.connect(**own_connection_params(), autocommit=True) as listener:
        listener.execute(f'LISTEN "{ACTIVITY_CHANNEL}"')
        services.job_submit(pipeline="noop")
        notifies = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.channel for n in notifies] == [ACTIVITY_CHANNEL]


def test_a_retry_tells_the_reset_state_after_its_stages_were_reset() -> None:
    job, _ = services.job_submit(pipeline="sleep", params={"seconds": 5})
    run = job.stages.get()
    claim = services.stage_start(stage_run_id=run.pk, worker="test")
    assert claim is not None
    services.stage_report(stage_run_id=run.pk, token=claim.token, progress=30)
    services.job_cancel(job_id=job.pk)
    services.stage_cancelled(stage_run_id=run.pk, token=claim.token)
    services.job_retry(job_id=job.pk)
    last = Activity.objects.filter(job_id=job.pk, kind="job:update").order_by("id").last()
    assert (last.data["status"], last.data["progress"]) == ("pending", 0.0)
    stage = Activity.objects.filter(job_id=job.pk, kind="stage:update").order_by("id").last()
    assert stage.data["status"] == "queued"
