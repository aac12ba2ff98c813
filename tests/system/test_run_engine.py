"""Engines as real processes: `manage.py run_engine` against a daphne serving the test
database, and the client (engines/sdk/client.py) and runner (engines/sdk/runner.py) against it."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engines import services
from engines.models import EngineInstance, Event, EventStatus
from engines.sdk.client import EngineApiError, EngineClient, EngineUnavailable
from engines.sdk.runner import EngineRunner, RunnerConfig
from omniva.models import AuditRecord
from tests.conftest import (
    ProcessGroup,
    Server,
    free_port,
    http_get,
    start_daphne,
    wait_for,
)
from tests.engines.conftest import stop_event_listener  # noqa: F401 (autouse, as in tests/engines/)
from tests.system.conftest import Engine

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def event_row(event_id: int) -> Event:
    return Event.objects.get(pk=event_id)


def wait_running(event_id: int, engine: Engine) -> Event:
    """Until the engine's handler reported progress on the event."""

    def running() -> Event | None:
        assert engine.process.poll() is None, engine.output()
        event = event_row(event_id)
        return event if event.status == EventStatus.LEASED and event.progress > 0 else None

    return wait_for(running, timeout=20, interval=0.05, what="the handler to report progress")


def test_an_echo_engine_completes_an_engine_echo_job_and_deregisters_on_sigterm(
    daphne: Server, engine_client: EngineClient, engine_secret: str, start_engine: Any
) -> None:
    engine = start_engine("echo")
    job = engine_client.request(
        "POST", "/jobs", {"pipeline": "engine_echo", "params": {"message": "hi"}}
    )
    headers = {"Authorization": f"Bearer {engine_secret}"}

    def finished() -> dict[str, Any] | None:
        assert engine.process.poll() is None, engine.output()
        data = http_get(f"{daphne.url}/v1/jobs/{job['id']}", headers=headers).json()["data"]
        return data if data["status"] in ("completed", "failed", "cancelled") else None

    done = wait_for(finished, timeout=30, interval=0.1, what="the job to finish")
    row = wait_for(
        lambda: EngineInstance.objects.filter(
            engine_type="echo", resource_utilization__has_key="rss_mb"
        ).first(),
        timeout=10,
        what="a heartbeat",
    )
    engine.stop()
    code = engine.process.wait(timeout=20)

    assert done["status"] == "completed", done
    assert done["result"] == {"echo": "hi"}
    assert done["stages"][0]["worker"] == row.name
    assert row.resource_utilization["rss_mb"] > 0
    assert row.reported_status in ("idle", "processing")
    assert code == 0, engine.output()
    assert not EngineInstance.objects.filter(engine_type="echo").exists()
    assert "deregistered" in engine.output()


def test_sigterm_lets_the_running_event_finish_and_be_reported_before_deregistering(
    engine_client: EngineClient, start_engine: Any
) -> None:
    engine_client.request("POST", "/event-types", {"name": "sleep", "engine_type": "sleep"})
    first = engine_client.request(
        "POST", "/events", {"event_type": "sleep", "data": {"seconds": 2}}
    )
    engine = start_engine("sleep", "--concurrency", "1")
    wait_running(first["id"], engine)
    # The engine's one slot is taken: this one waits in the queue.
    second = engine_client.request(
        "POST", "/events", {"event_type": "sleep", "data": {"seconds": 1}}
    )

    engine.stop()
    code = engine.process.wait(timeout=20)

    output = engine.output()
    assert code == 0, output
    finished = event_row(first["id"])
    assert finished.status == EventStatus.COMPLETED, output
    assert finished.result == {"slept_s": 2}
    waiting = event_row(second["id"])
    assert (waiting.status, waiting.retry_count, waiting.leased_by_id) == ("pending", 0, None)
    assert not EngineInstance.objects.filter(engine_type="sleep").exists()
    assert output.index(f"event {first['id']}: completed") < output.index("deregistered")


def test_a_second_sigterm_stops_at_once_and_the_event_goes_back_to_the_queue(
    engine_client: EngineClient, start_engine: Any
) -> None:
    engine_client.request("POST", "/event-types", {"name": "sleep", "engine_type": "sleep"})
    event = engine_client.request(
        "POST", "/events", {"event_type": "sleep", "data": {"seconds": 30}}
    )
    engine = start_engine("sleep")
    wait_running(event["id"], engine)

    engine.stop()
    wait_for(lambda: "draining" in engine.output(), timeout=10, what="the drain to start")
    engine.stop()
    code = engine.process.wait(timeout=10)

    assert code == 0, engine.output()
    released = event_row(event["id"])
    assert (released.status, released.retry_count, released.leased_by_id) == ("pending", 0, None)
    assert not EngineInstance.objects.filter(engine_type="sleep").exists()
    assert "stopped at once" in engine.output()


def test_the_client_registers_an_engine_and_a_taken_name_is_engine_already_registered(
    daphne: Server, engine_secret: str
) -> None:
    client = EngineClient(daphne.url, engine_secret)

    engine = client.register("echo", name="echo-a", capabilities=["text"])
    status = client.last_status
    with pytest.raises(EngineApiError) as refused:
        EngineClient(daphne.url, engine_secret).register("echo", name="echo-a")

    assert status == 201
    assert engine["engine_type"] == "echo"
    assert engine["name"] == "echo-a"
    assert engine["status"] == "active"
    assert engine["current_workload"] == 0
    assert engine["metadata"] == {
        "static_config": {"capabilities": ["text"], "resource_limits": {}},
        "dynamic_state": {"resource_utilization": {}},
    }
    assert client.engine_id == engine["id"]
    assert (refused.value.status, refused.value.code) == (409, "ENGINE_ALREADY_REGISTERED")
    assert refused.value.message


def test_the_client_claims_reports_and_deregisters_through_the_envelope(
    engine_client: EngineClient, daphne: Server, engine_secret: str
) -> None:
    engine_client.request("POST", "/event-types", {"name": "render", "engine_type": "actor"})
    created = engine_client.request("POST", "/events", {"event_type": "render", "data": {"n": 1}})
    client = EngineClient(daphne.url, engine_secret)
    client.register("actor")

    beat = client.heartbeat(status="idle", current_workload=0, resource_utilization={"rss_mb": 1})
    claimed = client.claim(batch_size=3, wait_s=0)
    token = claimed[0]["lease_token"]
    processing = client.report(created["id"], "processing", token, progress=50)
    completed = client.report(created["id"], "completed", token, result={"ok": True})
    with pytest.raises(EngineApiError) as stale:
        client.report(created["id"], "completed", token, result={"again": True})
    empty = client.claim(wait_s=0)
    engine_id = client.engine_id
    gone = client.deregister()
    with pytest.raises(EngineApiError) as unknown:
        EngineClient(daphne.url, engine_secret, engine_id=engine_id).heartbeat()

    assert beat["metadata"]["dynamic_state"]["resource_utilization"] == {"rss_mb": 1}
    assert [(e["id"], e["event_type"], e["data"]) for e in claimed] == [
        (created["id"], "render", {"n": 1})
    ]
    assert (processing["status"], processing["progress"]) == ("leased", 50)
    assert (completed["status"], completed["result"]) == ("completed", {"ok": True})
    assert (stale.value.status, stale.value.code) == (409, "EVENT_LEASE_LOST")
    assert empty == []
    assert gone["id"] == engine_id
    assert (unknown.value.status, unknown.value.code) == (404, "ENGINE_NOT_FOUND")


def test_the_client_raises_engine_unavailable_when_nothing_listens(engine_secret: str) -> None:
    client = EngineClient(f"http://127.0.0.1:{free_port()}", engine_secret, timeout=2)

    with pytest.raises(EngineUnavailable):
        client.register("echo")


@pytest.fixture
def runner_thread(daphne: Server, engine_secret: str) -> Iterator[Any]:
    """An EngineRunner in a thread of this process (no signals): stopped at teardown."""
    started: list[tuple[EngineRunner, threading.Thread]] = []

    def start(engine_type: str) -> EngineRunner:
        config = RunnerConfig(
            url=daphne.url, api_key=engine_secret, engine_type=engine_type, heartbeat_s=1, wait_s=2
        )
        runner = EngineRunner(config)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        started.append((runner, thread))
        return runner

    yield start
    for runner, thread in started:
        runner.request_stop(force=True)
        thread.join(timeout=10)


def test_an_event_type_without_a_handler_fails_with_unknown_event_type(
    engine_client: EngineClient, runner_thread: Any
) -> None:
    engine_client.request("POST", "/event-types", {"name": "mystery", "engine_type": "echo"})
    event = engine_client.request("POST", "/events", {"event_type": "mystery", "data": {}})
    runner = runner_thread("echo")

    failed = wait_for(
        lambda: (row := event_row(event["id"])).retry_count == 1 and row,
        timeout=20,
        what="the event's failure",
    )
    runner.request_stop()

    assert failed.status == EventStatus.PENDING  # retried after the backoff
    assert failed.error["code"] == "UNKNOWN_EVENT_TYPE"
    assert "mystery" in failed.error["message"]


def test_an_engine_the_server_forgot_registers_again_under_its_name(
    engine_client: EngineClient, runner_thread: Any
) -> None:
    runner = runner_thread("echo")
    first = wait_for(
        lambda: EngineInstance.objects.filter(engine_type="echo").first(),
        timeout=10,
        what="the registration",
    )

    engine_client.request("DELETE", f"/engine-instances/{first.pk}")
    again = wait_for(
        lambda: EngineInstance.objects.filter(name=first.name).exclude(pk=first.pk).first(),
        timeout=10,
        what="the second registration",
    )
    engine_id = wait_for(lambda: runner.client.engine_id, timeout=10, what="the new id")
    runner.request_stop()

    assert again.engine_type == "echo"
    assert engine_id == str(again.pk)


def test_the_engine_outlives_a_server_restart_and_takes_work_from_the_new_one(
    processes: ProcessGroup,
    daphne: Server,
    test_database_url: str,
    engine_secret: str,
    start_engine: Any,
    tmp_path: Path,
) -> None:
    engine = start_engine("echo")
    daphne.process.send_signal(signal.SIGKILL)
    daphne.process.wait(timeout=10)
    wait_for(
        lambda: "claim failed" in engine.output() or "heartbeat failed" in engine.output(),
        timeout=20,
        what="the engine to notice",
    )

    port = int(daphne.url.rsplit(":", 1)[1])
    restarted = start_daphne(processes, test_database_url, port, tmp_path / "daphne-2.log")
    job = EngineClient(restarted.url, engine_secret).request(
        "POST", "/jobs", {"pipeline": "engine_echo", "params": {"message": "again"}}
    )
    headers = {"Authorization": f"Bearer {engine_secret}"}

    def completed() -> dict[str, Any] | None:
        assert engine.process.poll() is None, engine.output()
        data = http_get(f"{restarted.url}/v1/jobs/{job['id']}", headers=headers).json()["data"]
        return data if data["status"] == "completed" else None

    done = wait_for(completed, timeout=30, interval=0.1, what="the job on the new daphne")
    engine.stop()

    assert done["result"] == {"echo": "again"}
    assert engine.process.wait(timeout=20) == 0, engine.output()
    assert not EngineInstance.objects.filter(engine_type="echo").exists()


# --- batched reports (PUT /v1/events/status) ---------------------------------------------------

BATCH_PATH = "/v1/events/status"


def status_requests() -> tuple[int, int]:
    """How many batched reports and how many per-event reports the server audited."""
    batched = AuditRecord.objects.filter(method="PUT", path=BATCH_PATH).count()
    single = AuditRecord.objects.filter(
        method="PUT", path__regex=r"^/v1/events/[0-9]+/status$"
    ).count()
    return batched, single


def test_the_client_reports_a_batch_in_one_request_and_a_stale_item_is_refused_alone(
    engine_client: EngineClient, daphne: Server, engine_secret: str
) -> None:
    engine_client.request("POST", "/event-types", {"name": "render", "engine_type": "actor"})
    for n in range(3):
        engine_client.request("POST", "/events", {"event_type": "render", "data": {"n": n}})
    client = EngineClient(daphne.url, engine_secret)
    client.register("actor")
    first, stale, third = client.claim(batch_size=3, wait_s=0)

    answers = client.report_batch(
        [
            {"id": first["id"], "status": "completed", "lease_token": first["lease_token"],
             "result": {"n": 0}},
            {"id": stale["id"], "status": "completed", "lease_token": str(uuid.uuid4()),
             "result": {"late": True}},
            {"id": third["id"], "status": "failed", "lease_token": third["lease_token"],
             "error": {"code": "NO_GPU", "message": "none left"}},
        ]
    )  # fmt: skip
    with pytest.raises(EngineApiError) as malformed:
        client.report_batch([{"id": first["id"], "status": "done", "lease_token": None}])

    assert [(a["id"], a["ok"]) for a in answers] == [
        (first["id"], True),
        (stale["id"], False),
        (third["id"], True),
    ]
    assert (answers[0]["event"]["status"], answers[0]["event"]["result"]) == (
        "completed",
        {"n": 0},
    )
    assert answers[1]["error"]["code"] == "EVENT_LEASE_LOST"
    assert (answers[2]["event"]["status"], answers[2]["event"]["retry_count"]) == ("pending", 1)
    assert event_row(stale["id"]).status == EventStatus.LEASED
    assert (malformed.value.status, malformed.value.code) == (400, "VALIDATION_ERROR")
    assert event_row(first["id"]).result == {"n": 0}
    # The audit rows are written by the server a moment after each answer.
    assert wait_for(lambda: status_requests() == (2, 0), timeout=10, what="the audit rows")


def test_run_engine_reports_a_claimed_batch_in_one_request(
    engine_client: EngineClient, start_engine: Any
) -> None:
    engine_client.request("POST", "/event-types", {"name": "echo", "engine_type": "echo"})
    ids = [
        engine_client.request("POST", "/events", {"event_type": "echo", "data": {"n": n}})["id"]
        for n in range(3)
    ]
    engine = start_engine("echo", "--batch-size", "3", "--concurrency", "3")

    def all_completed() -> bool:
        assert engine.process.poll() is None, engine.output()
        return Event.objects.filter(pk__in=ids, status=EventStatus.COMPLETED).count() == 3

    wait_for(all_completed, timeout=30, interval=0.1, what="the three events to complete")
    engine.stop()
    assert engine.process.wait(timeout=20) == 0, engine.output()

    # One batch request confirmed the three leases (processing at 0 %), one reported
    # the three results; no per-event report was sent.
    assert wait_for(lambda: status_requests() == (2, 0), timeout=10, what="the audit rows")
    assert [event_row(i).result for i in ids] == [{"echo": {"n": n}} for n in range(3)]
    output = engine.output()
    assert all(f"event {i}: completed" in output for i in ids), output


def test_a_batch_reports_its_other_events_when_one_lease_is_lost_mid_run(
    engine_client: EngineClient, start_engine: Any
) -> None:
    engine_client.request("POST", "/event-types", {"name": "sleep", "engine_type": "sleep"})
    quick = engine_client.request("POST", "/events", {"event_type": "sleep", "data": {}})
    slow = engine_client.request("POST", "/events", {"event_type": "sleep", "data": {"seconds": 3}})
    engine = start_engine("sleep", "--batch-size", "2", "--concurrency", "2")
    wait_running(slow["id"], engine)

    # An operator moves the slow one to the dead letter queue while the engine runs it:
    # its next progress report is refused and its work dropped.
    services.event_dead_letter(event_id=slow["id"], reason="operator")

    def quick_completed() -> bool:
        assert engine.process.poll() is None, engine.output()
        return event_row(quick["id"]).status == EventStatus.COMPLETED

    wait_for(quick_completed, timeout=30, interval=0.1, what="the quick event's report")
    engine.stop()
    assert engine.process.wait(timeout=20) == 0, engine.output()

    dropped = event_row(slow["id"])
    assert (dropped.status, dropped.error["code"]) == (EventStatus.DEAD_LETTERED, "DEAD_LETTERED")
    assert f"event {slow['id']}" in engine.output()
    assert "its work is dropped" in engine.output()
    assert wait_for(lambda: status_requests()[0] == 2, timeout=10, what="the audit rows")
