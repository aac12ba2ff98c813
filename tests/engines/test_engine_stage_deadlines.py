"""A job's timeout_s on its engine stages (issue 19, item 3): no worker's alarm runs there,
so the deadline is derived. A job that no engine takes, or whose engine reports after the
deadline, ends `timed_out` and its event leaves the queue, whoever meets it first.

Time is real and short: each job has a timeout of a few seconds, and the tests wait on
the clock passing its deadline (read from the job's row), never for a fixed time."""

from __future__ import annotations

from datetime import datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from engines.models import Event, EventStatus
from jobs.models import Job, JobStatus, StageStatus
from tests.conftest import wait_for

# The claim's callback (the stage runs on that engine) runs after its commit.
pytestmark = pytest.mark.django_db(transaction=True)


def post(api: Any, path: str, body: Any) -> Any:
    return api.post(path, body, content_type="application/json")


def put(api: Any, path: str, body: Any) -> Any:
    return api.put(path, body, content_type="application/json")


def submit_echo(api: Any, timeout_s: int, **extra: Any) -> Job:
    body = {"pipeline": "engine_echo", "params": {"message": "hi"}, "timeout_s": timeout_s}
    response = post(api, "/v1/jobs", {**body, **extra})
    assert response.status_code == 202, response.json()
    return Job.objects.get(pk=response.json()["data"]["id"])


def read_job(api: Any, job: Job) -> dict[str, Any]:
    response = api.get(f"/v1/jobs/{job.pk}")
    assert response.status_code == 200
    return response.json()["data"]


def claim(api: Any, engine_id: str | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"engine_type": "echo", "batch_size": 10}
    if engine_id:
        body["engine_id"] = engine_id
    response = post(api, "/v1/events/claim", body)
    assert response.status_code == 200, response.json()
    return response.json()["data"]


def wait_past(moment: datetime) -> None:
    wait_for(lambda: timezone.now() > moment, timeout=30, what=f"the clock to pass {moment}")


def test_a_job_no_engine_takes_reads_timed_out_after_its_timeout_and_its_event_is_not_claimable(
    api: Any,
) -> None:
    job = submit_echo(api, timeout_s=1)
    assert read_job(api, job)["status"] == "pending"

    # No engine of its type is online; nothing but this read meets the job.
    ended = wait_for(
        lambda: (data := read_job(api, job))["status"] == "timed_out" and data,
        timeout=15,
        what="the job to read timed_out",
    )

    assert ended["error"]["code"] == "TIMEOUT"
    assert "timeout_s (1 s)" in ended["error"]["message"]
    assert [stage["status"] for stage in ended["stages"]] == [StageStatus.TIMED_OUT]
    event = Event.objects.get()
    assert event.status == EventStatus.DEAD_LETTERED
    assert event.error["code"] == "STAGE_ENDED"
    # An engine that comes now finds nothing to do.
    engine = post(api, "/v1/engine-instances", {"engine_type": "echo"}).json()["data"]
    assert claim(api, engine["id"]) == []


def test_a_claim_does_not_hand_out_the_event_of_a_job_past_its_deadline(api: Any) -> None:
    job = submit_echo(api, timeout_s=1)
    wait_past(job.pending_since + timedelta(seconds=1))
    engine = post(api, "/v1/engine-instances", {"engine_type": "echo"}).json()["data"]

    # Nobody read the job: the claim is the first to meet it, and settles it.
    assert claim(api, engine["id"]) == []

    job.refresh_from_db()
    assert (job.status, job.error["code"]) == (JobStatus.TIMED_OUT, "TIMEOUT")
    assert Event.objects.get().status == EventStatus.DEAD_LETTERED


@pytest.mark.parametrize(
    "report",
    [
        {"status": "completed", "result": {"echo": "late"}},
        {"status": "failed", "error": {"code": "LATE", "message": "too late"}},
        {"status": "processing", "progress": 90},
    ],
    ids=["completed", "failed", "processing"],
)
def test_an_engine_that_heartbeats_but_reports_after_the_deadline_times_the_job_out(
    api: Any, report: dict[str, Any]
) -> None:
    job = submit_echo(api, timeout_s=2)
    engine = post(api, "/v1/engine-instances", {"engine_type": "echo"}).json()["data"]
    [event] = claim(api, engine["id"])
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING

    # The engine keeps heartbeating (its lease stays extended) past the job's deadline.
    def heartbeat_past_deadline() -> bool:
        beat = put(api, f"/v1/engine-instances/{engine['id']}/heartbeat", {"status": "active"})
        assert beat.status_code == 200
        return timezone.now() > job.started_at + timedelta(seconds=2)

    wait_for(heartbeat_past_deadline, timeout=30, interval=0.2, what="the job's deadline")
    late = put(
        api, f"/v1/events/{event['id']}/status", {**report, "lease_token": event["lease_token"]}
    )

    assert late.status_code == 409
    assert late.json()["error"]["code"] == "EVENT_LEASE_LOST"
    ended = read_job(api, job)
    assert (ended["status"], ended["result"]) == ("timed_out", None)
    assert ended["error"]["code"] == "TIMEOUT"
    assert Event.objects.get().status == EventStatus.DEAD_LETTERED


def test_a_job_an_engine_took_in_time_runs_for_its_whole_timeout(api: Any) -> None:
    job = submit_echo(api, timeout_s=3)
    # It waits for an engine for most of its timeout...
    wait_past(job.pending_since + timedelta(seconds=1))
    engine = post(api, "/v1/engine-instances", {"engine_type": "echo"}).json()["data"]
    [event] = claim(api, engine["id"])
    # ...and is still running once the time it waited plus timeout_s has passed: its run
    # time is what timeout_s bounds, from the claim on.
    wait_past(job.pending_since + timedelta(seconds=3))
    assert read_job(api, job)["status"] == "running"

    done = put(
        api,
        f"/v1/events/{event['id']}/status",
        {"status": "completed", "result": {"echo": "hi"}, "lease_token": event["lease_token"]},
    )

    assert done.status_code == 200, done.json()
    assert read_job(api, job)["status"] == "completed"


def test_cleanup_times_out_engine_jobs_past_their_deadline_that_nothing_else_met(
    api: Any,
) -> None:
    job = submit_echo(api, timeout_s=1)
    wait_past(job.pending_since + timedelta(seconds=1))

    out = StringIO()
    call_command("cleanup", stdout=out)

    assert "Took 1 events past their deadline out of the queue" in out.getvalue()

    job.refresh_from_db()
    assert job.status == JobStatus.TIMED_OUT
    assert Event.objects.get().status == EventStatus.DEAD_LETTERED
