"""The Jobs endpoints of API.md: shapes, status codes and every error code of the section."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from jobs import services
from jobs.models import Job, JobStatus, QueueTask
from omniva.errors import OmnivaError
from omniva.models import Project, Scope
from tests.jobs.conftest import claim_one, run_delivery

pytestmark = pytest.mark.django_db


def post(api: Any, path: str, body: Any = None, **extra: Any) -> Any:
    return api.post(
        path, body if body is not None else {}, content_type="application/json", **extra
    )


def test_submit_answers_202_with_the_job_and_its_stages(api: Any) -> None:
    response = post(api, "/v1/jobs", {"pipeline": "fan_out_fan_in", "params": {"width": 2}})
    assert response.status_code == 202
    job = response.json()["data"]
    assert job["status"] == "pending"
    assert job["priority"] == 5
    assert job["max_retries"] == 3
    assert [s["name"] for s in job["stages"]] == ["split", "part_0", "part_1", "join"]
    assert job["stages"][0]["status"] == "queued"
    assert job["stages"][0]["queue"] == "default"
    assert "estimated_completion_ms" in job


def test_a_submission_answers_the_job_as_a_read_right_after_shows_it(api: Any) -> None:
    # The answer is rendered from what the submission created, not read back: it must
    # be what a read of the stored job shows.
    for body in (
        {"pipeline": "fan_out_fan_in", "params": {"width": 3}, "priority": "high"},
        {"pipeline": "noop", "max_retries": 0, "timeout_s": 60, "queue_timeout_s": 30},
    ):
        answered = post(api, "/v1/jobs", body).json()["data"]
        stored = api.get(f"/v1/jobs/{answered['id']}").json()["data"]
        answered.pop("estimated_completion_ms")
        stored.pop("estimated_completion_ms")
        assert answered == stored


def test_priority_words_map_to_numbers(api: Any) -> None:
    for word, number in {"low": 2, "normal": 5, "high": 8, "urgent": 10}.items():
        response = post(api, "/v1/jobs", {"pipeline": "noop", "priority": word})
        assert response.json()["data"]["priority"] == number
    assert set(QueueTask.objects.values_list("priority", flat=True)) == {2, 5, 8, 10}


def test_a_finished_job_shows_result_times_and_no_estimate(api: Any, drain: Any) -> None:
    job_id = post(api, "/v1/jobs", {"pipeline": "noop"}).json()["data"]["id"]
    drain()
    job = api.get(f"/v1/jobs/{job_id}").json()["data"]
    assert job["status"] == "completed"
    assert job["result"] == {}
    assert job["progress"] == 100
    assert job["queue_time_ms"] is not None
    assert job["run_time_ms"] is not None
    assert "estimated_completion_ms" not in job
    assert job["stages"][0]["worker"]
    assert job["stages"][0]["duration_ms"] is not None


def test_idempotency_key_header_returns_the_first_job(api: Any) -> None:
    first = post(api, "/v1/jobs", {"pipeline": "noop"}, HTTP_IDEMPOTENCY_KEY="abc-1")
    second = post(api, "/v1/jobs", {"pipeline": "noop"}, HTTP_IDEMPOTENCY_KEY="abc-1")
    assert first.status_code == 202
    assert second.status_code == 200
    assert first.json()["data"]["id"] == second.json()["data"]["id"]
    assert second.json()["data"]["idempotency_key"] == "abc-1"
    assert Job.objects.count() == 1


def test_idempotency_key_field_works_like_the_header(api: Any) -> None:
    first = post(api, "/v1/jobs", {"pipeline": "noop", "idempotency_key": "k"})
    second = post(api, "/v1/jobs", {"pipeline": "noop"}, HTTP_IDEMPOTENCY_KEY="k")
    assert first.json()["data"]["id"] == second.json()["data"]["id"]


def test_list_filters_by_status_pipeline_and_priority_newest_first(api: Any, drain: Any) -> None:
    post(api, "/v1/jobs", {"pipeline": "noop", "priority": 1})
    drain()
    post(api, "/v1/jobs", {"pipeline": "sleep", "params": {"seconds": 1}, "priority": 9})
    post(api, "/v1/jobs", {"pipeline": "noop", "priority": 9})
    all_jobs = api.get("/v1/jobs").json()
    assert all_jobs["meta"]["pagination"]["count"] == 3
    created = [job["created_at"] for job in all_jobs["data"]]
    assert created == sorted(created, reverse=True)
    assert len(api.get("/v1/jobs?status=completed").json()["data"]) == 1
    assert len(api.get("/v1/jobs?status=pending&pipeline=noop").json()["data"]) == 1
    assert len(api.get("/v1/jobs?priority_min=9").json()["data"]) == 2
    later = (timezone.now() + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert api.get("/v1/jobs", {"created_after": later}).json()["data"] == []


def test_logs_are_listed_oldest_first_and_paginated(api: Any, drain: Any) -> None:
    job_id = post(api, "/v1/jobs", {"pipeline": "fail_n_times", "params": {"n": 2}}).json()["data"][
        "id"
    ]
    with override_settings(OMNIVA_RETRY_BACKOFF_S=[0]):
        drain()  # the backoff of 0 s makes the retries due at once
    logs = api.get(f"/v1/jobs/{job_id}/logs?limit=1")
    assert logs.json()["meta"]["pagination"]["count"] >= 2
    entry = logs.json()["data"][0]
    assert set(entry) == {"at", "level", "stage", "message"}
    assert entry["stage"] == "flaky"
    assert entry["level"] == "warning"


def test_cancel_pending_is_200_and_cancel_finished_is_409(api: Any, drain: Any) -> None:
    job_id = post(api, "/v1/jobs", {"pipeline": "noop"}).json()["data"]["id"]
    cancelled = post(api, f"/v1/jobs/{job_id}/cancel", {"reason": "no longer needed"})
    assert cancelled.status_code == 200
    assert cancelled.json()["data"]["status"] == "cancelled"
    assert cancelled.json()["data"]["cancel_reason"] == "no longer needed"
    again = post(api, f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "JOB_NOT_CANCELLABLE"


def test_cancel_running_is_202(api: Any) -> None:
    from jobs import services

    job_id = post(api, "/v1/jobs", {"pipeline": "sleep", "params": {"seconds": 5}}).json()["data"][
        "id"
    ]
    run = Job.objects.get(pk=job_id).stages.get()
    services.stage_start(stage_run_id=run.pk, worker="test")
    response = post(api, f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["data"]["status"] == "running"


def test_retry_is_200_for_failed_and_409_otherwise(api: Any, drain: Any) -> None:
    body = {"pipeline": "fail_n_times", "params": {"n": 1}, "max_retries": 0}
    job_id = post(api, "/v1/jobs", body).json()["data"]["id"]
    assert post(api, f"/v1/jobs/{job_id}/retry").json()["error"]["code"] == "JOB_NOT_RETRYABLE"
    drain()
    assert api.get(f"/v1/jobs/{job_id}").json()["data"]["status"] == "failed"
    retried = post(api, f"/v1/jobs/{job_id}/retry")
    assert retried.status_code == 200
    assert retried.json()["data"]["status"] == "pending"
    drain()
    job = api.get(f"/v1/jobs/{job_id}").json()["data"]
    assert job["status"] == "completed"
    assert job["attempts"] == 2


def test_delete_is_409_while_active_and_removes_when_finished(api: Any, drain: Any) -> None:
    job_id = post(api, "/v1/jobs", {"pipeline": "noop"}).json()["data"]["id"]
    active = api.delete(f"/v1/jobs/{job_id}")
    assert active.status_code == 409
    assert active.json()["error"]["code"] == "JOB_ACTIVE"
    drain()
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert api.get(f"/v1/jobs/{job_id}").json()["error"]["code"] == "JOB_NOT_FOUND"


def test_cleanup_reports_how_many_it_cleared(api: Any, drain: Any) -> None:
    post(api, "/v1/jobs", {"pipeline": "noop"})
    drain()
    Job.objects.update(finished_at=timezone.now() - timedelta(days=3))
    response = post(api, "/v1/jobs/cleanup", {"max_age_s": 86400, "statuses": ["completed"]})
    assert response.status_code == 200
    assert response.json()["data"] == {"cleared": 1}
    bad = post(api, "/v1/jobs/cleanup", {"statuses": ["running"]})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "VALIDATION_ERROR"
    # An age whose cutoff would be before year 1 is refused, not a crash (schemathesis).
    ancient = post(api, "/v1/jobs/cleanup", {"max_age_s": 10**12})
    assert (ancient.status_code, ancient.json()["error"]["code"]) == (400, "VALIDATION_ERROR")
    with pytest.raises(OmnivaError):
        services.jobs_cleanup(max_age_s=10**12)


def test_batch_returns_a_parent_whose_result_aggregates_its_children(api: Any, drain: Any) -> None:
    body = {
        "items": [{"pipeline": "noop"}, {"pipeline": "fan_out_fan_in", "params": {"width": 2}}],
        "priority": "high",
    }
    response = post(api, "/v1/jobs/batch", body)
    assert response.status_code == 202
    parent = response.json()["data"]
    assert parent["pipeline"] == "batch"
    children = api.get(f"/v1/jobs?parent={parent['id']}").json()["data"]
    assert len(children) == 2
    assert all(child["priority"] == 8 for child in children)
    drain(limit=1)
    assert api.get(f"/v1/jobs/{parent['id']}").json()["data"]["progress"] == 50
    drain()
    done = api.get(f"/v1/jobs/{parent['id']}").json()["data"]
    assert done["status"] == "completed"
    assert done["result"]["total"] == 2
    assert done["result"]["errors"] == []
    assert {r["pipeline"] for r in done["result"]["results"]} == {"noop", "fan_out_fan_in"}


def test_pipelines_lists_params_schema_and_stages(api: Any) -> None:
    pipelines = {p["name"]: p for p in api.get("/v1/pipelines").json()["data"]}
    assert {"noop", "sleep", "fail_n_times", "fan_out_fan_in"} <= set(pipelines)
    fan = pipelines["fan_out_fan_in"]
    assert fan["params_schema"]["properties"]["width"]["type"] == "integer"
    join = next(stage for stage in fan["stages"] if stage["name"] == "join")
    assert join["depends_on"] == ["part_0", "part_1", "part_2"]
    assert join["queue"] == "default"
    assert join["engine_type"] is None


def test_metrics_count_jobs_by_status_and_queue_depth(api: Any, drain: Any) -> None:
    post(api, "/v1/jobs", {"pipeline": "noop"})
    drain()
    post(api, "/v1/jobs", {"pipeline": "noop"})
    data = api.get("/v1/metrics").json()["data"]
    assert data["jobs"]["total"] == 2
    assert data["jobs"]["completed"] == 1
    assert data["jobs"]["pending"] == 1
    assert data["jobs"]["success_rate"] == 1.0
    assert data["queues"]["default"]["depth"] == 1
    text = api.get("/metrics").content.decode()
    assert 'omniva_jobs_submitted_total{pipeline="noop"} 2.0' in text
    assert 'omniva_jobs_finished_total{pipeline="noop",status="completed"} 1.0' in text
    assert 'omniva_queue_depth{queue="default"} 1.0' in text
    assert 'omniva_job_duration_seconds_count{pipeline="noop"} 1.0' in text
    assert (
        'omniva_stage_duration_seconds_count{pipeline="noop",queue="default",stage="noop"}' in text
    )


def test_info_lists_the_pipelines(client: Any) -> None:
    config = client.get("/v1/info").json()["data"]["config"]
    assert "fan_out_fan_in" in config["pipelines"]
    assert config["backoff_s"] == [30, 60, 120]


def test_a_pending_job_past_its_queue_timeout_reads_as_timed_out(api: Any) -> None:
    job_id = post(api, "/v1/jobs", {"pipeline": "noop", "queue_timeout_s": 5}).json()["data"]["id"]
    Job.objects.filter(pk=job_id).update(pending_since=timezone.now() - timedelta(seconds=10))
    job = api.get(f"/v1/jobs/{job_id}").json()["data"]
    assert job["status"] == "timed_out"
    assert job["error"]["code"] == "TIMEOUT"


def test_a_due_job_deleted_after_the_list_read_it_is_shown_as_read_not_a_404() -> None:
    job, _ = services.job_submit(pipeline="noop", queue_timeout_s=5)
    Job.objects.filter(pk=job.pk).update(pending_since=timezone.now() - timedelta(seconds=10))
    read = Job.objects.get(pk=job.pk)
    Job.objects.filter(pk=job.pk).delete()

    assert services.jobs_settle_due(jobs=[read]) == [read]


def test_the_list_shows_a_job_past_its_queue_timeout_as_the_detail_does(api: Any) -> None:
    """One rule for every read (services.jobs_settle_due): the list does not go on
    showing `pending` for a job its detail reads as timed out."""
    overdue = post(api, "/v1/jobs", {"pipeline": "noop", "queue_timeout_s": 5}).json()["data"]
    waiting = post(api, "/v1/jobs", {"pipeline": "noop", "queue_timeout_s": 60}).json()["data"]
    Job.objects.filter(pk__in=[overdue["id"], waiting["id"]]).update(
        pending_since=timezone.now() - timedelta(seconds=10)
    )

    listed = {job["id"]: job for job in api.get("/v1/jobs").json()["data"]}

    assert listed[overdue["id"]]["status"] == "timed_out"
    assert listed[overdue["id"]]["error"]["code"] == "TIMEOUT"
    assert listed[waiting["id"]]["status"] == "pending"
    assert Job.objects.get(pk=overdue["id"]).status == JobStatus.TIMED_OUT


# --- error codes of the Jobs section ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"pipeline": "no_such_thing"}, "UNKNOWN_PIPELINE", "pipeline"),
        (
            {"pipeline": "sleep", "params": {"seconds": "long"}},
            "VALIDATION_ERROR",
            "params.seconds",
        ),
        ({"pipeline": "noop", "params": {"extra": 1}}, "VALIDATION_ERROR", "params"),
        ({"pipeline": "noop", "params": [1]}, "VALIDATION_ERROR", "params"),
        ({"pipeline": "noop", "priority": 11}, "VALIDATION_ERROR", "priority"),
        ({"pipeline": "noop", "priority": "asap"}, "VALIDATION_ERROR", "priority"),
        ({"pipeline": "noop", "max_retries": 11}, "VALIDATION_ERROR", "max_retries"),
        ({"pipeline": "noop", "timeout_s": 0}, "VALIDATION_ERROR", "timeout_s"),
        ({"pipeline": "noop", "sync_timeout_s": 301}, "VALIDATION_ERROR", "sync_timeout_s"),
        ({"params": {}}, "VALIDATION_ERROR", "pipeline"),
        (
            {"pipeline": "noop", "project": "00000000-0000-0000-0000-000000000000"},
            "VALIDATION_ERROR",
            "project",
        ),
    ],
)
def test_bad_submissions_get_a_400_with_a_code_and_create_nothing(
    api: Any, body: dict[str, Any], code: str, field: str
) -> None:
    response = post(api, "/v1/jobs", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert field in error["details"]
    assert not Job.objects.exists()
    assert not QueueTask.objects.exists()


def test_malformed_json_is_400_malformed_request(api: Any) -> None:
    response = api.post("/v1/jobs", "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MALFORMED_REQUEST"


def test_a_bad_batch_item_rejects_the_whole_batch(api: Any) -> None:
    body = {"items": [{"pipeline": "noop"}, {"pipeline": "nope"}]}
    response = post(api, "/v1/jobs/batch", body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "UNKNOWN_PIPELINE"
    assert not Job.objects.exists()


@pytest.mark.parametrize("job_id", ["abc", "-1", "12", "00000000-0000-0000-0000-000000000000"])
def test_unknown_or_malformed_job_ids_are_404_job_not_found(api: Any, job_id: str) -> None:
    for response in (
        api.get(f"/v1/jobs/{job_id}"),
        api.get(f"/v1/jobs/{job_id}/logs"),
        post(api, f"/v1/jobs/{job_id}/cancel"),
        post(api, f"/v1/jobs/{job_id}/retry"),
        api.delete(f"/v1/jobs/{job_id}"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "JOB_NOT_FOUND"


@override_settings(OMNIVA_QUEUE_LIMIT=2)
def test_a_saturated_queue_answers_503_with_retry_after(api: Any) -> None:
    post(api, "/v1/jobs", {"pipeline": "noop"})
    post(api, "/v1/jobs", {"pipeline": "noop"})
    from jobs import services

    services.queue_depths_forget()
    response = post(api, "/v1/jobs", {"pipeline": "noop"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "QUEUE_SATURATED"
    assert int(response["Retry-After"]) > 0
    assert Job.objects.count() == 2


def test_a_read_only_key_cannot_submit_and_no_key_is_401(client: Any, make_key: Any) -> None:
    reader = make_key(Scope.JOBS_READ)
    denied = client.post(
        "/v1/jobs", {"pipeline": "noop"}, content_type="application/json", **reader.headers
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "PERMISSION_DENIED"
    assert client.get("/v1/jobs", **reader.headers).status_code == 200
    anonymous = client.get("/v1/jobs")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "UNAUTHENTICATED"


def test_a_project_key_sees_and_submits_to_its_project_only(client: Any, make_key: Any) -> None:
    mine = Project.objects.create(name="mine")
    other = Project.objects.create(name="other")
    key = make_key(Scope.JOBS_READ, Scope.JOBS_WRITE, project=mine)
    admin = make_key(Scope.ADMIN)
    theirs = client.post(
        "/v1/jobs",
        {"pipeline": "noop", "project": str(other.pk)},
        content_type="application/json",
        **admin.headers,
    ).json()["data"]["id"]
    own = client.post(
        "/v1/jobs", {"pipeline": "noop"}, content_type="application/json", **key.headers
    ).json()["data"]
    assert own["project"] == str(mine.pk)
    listed = client.get("/v1/jobs", **key.headers).json()["data"]
    assert [job["id"] for job in listed] == [own["id"]]
    hidden = client.get(f"/v1/jobs/{theirs}", **key.headers)
    assert hidden.status_code == 404
    assert hidden.json()["error"]["code"] == "JOB_NOT_FOUND"
    crossing = client.post(
        "/v1/jobs",
        {"pipeline": "noop", "project": str(other.pk)},
        content_type="application/json",
        **key.headers,
    )
    assert crossing.status_code == 403


def test_a_project_key_cannot_reach_another_projects_job_by_idempotency_key(
    client: Any, make_key: Any
) -> None:
    mine = Project.objects.create(name="mine")
    other = Project.objects.create(name="other")
    key = make_key(Scope.JOBS_WRITE, project=mine)
    admin = make_key(Scope.ADMIN)
    body = {"pipeline": "noop", "idempotency_key": "shared"}
    client.post(
        "/v1/jobs", {**body, "project": str(other.pk)}, content_type="application/json",
        **admin.headers,
    )  # fmt: skip
    response = client.post("/v1/jobs", body, content_type="application/json", **key.headers)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "CONFLICT"
    assert response.json()["data"] is None
    assert Job.objects.count() == 1


# --- sync submission ------------------------------------------------------------------------


def _worker_thread(stop: threading.Event) -> threading.Thread:
    """An in-process worker on its own connection, for tests whose request blocks."""

    def work() -> None:
        try:
            while not stop.is_set():
                claimed = claim_one("default")
                if claimed is None:
                    stop.wait(0.01)
                    continue
                run_delivery(*claimed)
        finally:
            connection.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


# A DAG finishes through the general path, a one-stage job through the one-statement
# completion: both must send the job-done notification the wait is woken by.
@pytest.mark.parametrize(
    ("pipeline", "result_key"), [("fan_out_fan_in", "sum_of_squares"), ("noop", None)]
)
@pytest.mark.django_db(transaction=True)
def test_sync_submission_returns_the_finished_job(
    api: Any, pipeline: str, result_key: str | None
) -> None:
    stop = threading.Event()
    worker = _worker_thread(stop)
    try:
        response = post(api, "/v1/jobs", {"pipeline": pipeline, "sync": True, "sync_timeout_s": 30})
    finally:
        stop.set()
        worker.join()
    assert response.status_code == 200
    job = response.json()["data"]
    assert job["status"] == "completed"
    if result_key:
        assert job["result"][result_key] == 5


@pytest.mark.django_db(transaction=True)
def test_sync_submission_answers_202_when_the_wait_runs_out(api: Any) -> None:
    response = post(api, "/v1/jobs", {"pipeline": "noop", "sync": True, "sync_timeout_s": 0.3})
    assert response.status_code == 202
    assert response.json()["data"]["status"] == JobStatus.PENDING
