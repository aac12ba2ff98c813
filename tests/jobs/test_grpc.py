"""The gRPC OrchestratorService (jobs/grpc/service.py) through a real gRPC client.

Most tests start the server in this process on a free port and run stages with the
in-process worker (`drain`); the database is committed (transaction=True) so that the
server's threads see what a test wrote. The `slow` ones start `manage.py grpcserver`
and a `qcluster` as processes, the way `make run` does.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from django.conf import settings
from django.test import override_settings

from jobs import services
from jobs.grpc import service as grpc_service
from jobs.models import Job, JobStatus
from omniva import services as core_services
from omniva.errors import ErrorCode
from omniva.models import Project, Scope
from tests.conftest import KeyHandle, ProcessGroup, free_port, process_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

pb = grpc_service.orchestrator_pb2
pb_grpc = grpc_service.orchestrator_pb2_grpc
CALL_TIMEOUT_S = 30

# --- fixtures ---------------------------------------------------------------------------------


@dataclass
class Client:
    """A stub on a channel to the server, sending one key's metadata with every call."""

    stub: Any
    metadata: list[tuple[str, str]]

    def submit(self, **fields: Any) -> Any:
        return self.stub.SubmitTask(
            pb.TaskRequest(**fields), metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )

    def status(self, task_id: str) -> Any:
        return self.stub.GetTaskStatus(
            pb.TaskStatusRequest(task_id=task_id), metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )

    def stream(
        self, task_id: str, after: int = 0, extra: list[tuple[str, str]] | None = None
    ) -> Any:
        return self.stub.StreamTaskUpdates(
            pb.TaskStatusRequest(task_id=task_id, after_sequence=after),
            metadata=self.metadata + (extra or []),
            timeout=CALL_TIMEOUT_S * 3,
        )

    def cancel(self, task_id: str, reason: str = "") -> Any:
        return self.stub.CancelTask(
            pb.TaskCancelRequest(task_id=task_id, reason=reason),
            metadata=self.metadata,
            timeout=CALL_TIMEOUT_S,
        )


@pytest.fixture
def channel_to() -> Iterator[Callable[[int], grpc.Channel]]:
    channels: list[grpc.Channel] = []

    def open_channel(port: int) -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        channel.close()


@pytest.fixture
def grpc_port(transactional_db: None) -> Iterator[int]:
    """The service in this process, on a free port."""
    server = grpc_service.build_server(host="127.0.0.1", port=0, workers=8)
    server.start()
    yield server.port
    server.stop(0)


@pytest.fixture
def client_for(grpc_port: int, channel_to: Callable[[int], grpc.Channel]) -> Callable[..., Client]:
    stub = pb_grpc.OrchestratorServiceStub(channel_to(grpc_port))

    def client(key: KeyHandle | None = None, *, header: str = "x-api-key") -> Client:
        if key is None:
            return Client(stub, [])
        value = key.secret if header == "x-api-key" else f"Bearer {key.secret}"
        return Client(stub, [(header, value)])

    return client


@pytest.fixture
def writer(make_key: Callable[..., KeyHandle], client_for: Callable[..., Client]) -> Client:
    return client_for(make_key(Scope.JOBS_READ, Scope.JOBS_WRITE))


def json_input(params: dict[str, Any]) -> Any:
    return pb.Input(input_id="params", type="json", data=json.dumps(params))


def refused(call: Callable[[], Any]) -> grpc.RpcError:
    """The error a call ends with (a stream's while it is read)."""

    def call_to_the_end() -> None:
        result = call()
        if isinstance(result, grpc.Call):  # a stream: its error comes as it is read
            list(result)

    with pytest.raises(grpc.RpcError) as info:
        call_to_the_end()
    return info.value


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return {item.key: item.value for item in error.trailing_metadata() or ()}


# --- submit ---------------------------------------------------------------------------------


def test_submit_task_creates_a_job_of_the_pipeline_with_its_params_priority_and_timeout(
    writer: Client,
) -> None:
    response = writer.submit(
        task_type="fan_out_fan_in", inputs=[json_input({"width": 2})], priority=8, timeout_ms=1500
    )

    job = Job.objects.get(pk=response.task_id)
    assert response.created
    assert response.status == pb.QUEUED == pb.PENDING
    assert job.pipeline == "fan_out_fan_in"
    assert job.params == {"width": 2}
    assert job.priority == 8
    assert job.timeout_s == 2  # 1.5 s, rounded up
    assert [stage.name for stage in job.stages.all()] == ["split", "part_0", "part_1", "join"]


def test_a_task_without_priority_or_timeout_gets_the_defaults(writer: Client) -> None:
    response = writer.submit(task_type="noop")

    job = Job.objects.get(pk=response.task_id)
    assert job.priority == 5
    assert job.timeout_s == settings.OMNIVA_JOB_TIMEOUT_S
    assert job.params == {}


def test_the_same_task_id_returns_the_first_task_and_names_it_in_later_calls(
    writer: Client,
) -> None:
    first = writer.submit(task_id="task-001", task_type="noop")
    again = writer.submit(task_id="task-001", task_type="noop")

    assert first.created
    assert not again.created
    assert again.task_id == first.task_id
    assert Job.objects.count() == 1
    assert writer.status("task-001").task_id == first.task_id


def test_report_generation_passes_inputs_metadata_and_execution_mode_as_report_params(
    writer: Client,
) -> None:
    response = writer.submit(
        task_id="report-1",
        task_type="report_generation",
        inputs=[
            pb.Input(input_id="numbers", type="json", data='{"values": [1, 2, 3]}'),
            pb.Input(input_id="more", type="json", data="[4, 5]"),
        ],
        metadata={"report_title": "My Report"},
        execution_mode=pb.PARALLEL,
    )

    job = Job.objects.get(pk=response.task_id)
    assert job.pipeline == "report"
    assert job.params == {
        "inputs": [
            {"input_id": "numbers", "type": "json", "data": '{"values": [1, 2, 3]}'},
            {"input_id": "more", "type": "json", "data": "[4, 5]"},
        ],
        "metadata": {"report_title": "My Report"},
        "execution_mode": "parallel",
    }
    assert job.idempotency_key == "report-1"


def test_a_fixed_shape_pipeline_ignores_execution_mode_and_metadata_and_says_so(
    writer: Client,
) -> None:
    response = writer.submit(task_type="noop", execution_mode=pb.HYBRID, metadata={"a": "b"})

    assert response.created
    assert "execution_mode hybrid was ignored" in response.message
    assert "takes no metadata" in response.message
    assert Job.objects.get(pk=response.task_id).params == {}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"task_type": "no_such_pipeline"}, "task_type"),
        ({"task_type": ""}, "task_type"),
        ({"task_type": "sleep", "inputs": [json_input({"seconds": -1})]}, "params.seconds"),
        ({"task_type": "sleep", "inputs": [pb.Input(input_id="x", type="text", data="1")]},
         "inputs"),
        ({"task_type": "sleep", "inputs": [pb.Input(input_id="x", type="json", data="[1]")]},
         "inputs"),
        ({"task_type": "report", "execution_mode": pb.SEQUENTIAL}, "params"),
        ({"task_type": "noop", "priority": 11}, "priority"),
        ({"task_type": "noop", "timeout_ms": -5}, "timeout_ms"),
        ({"task_type": "noop", "task_id": "x" * 201}, "task_id"),
        # PostgreSQL stores U+0000 nowhere: refused in any string of the request.
        ({"task_type": "noop", "task_id": "a\x00"}, "task_id"),
        ({"task_type": "engine_echo",
          "inputs": [pb.Input(input_id="message", type="text", data="hi\x00")]},
         "inputs.0.data"),
        ({"task_type": "engine_echo", "inputs": [json_input({"message": "hi\x00"})]},
         "params.message"),
    ],
)  # fmt: skip
def test_a_bad_submission_is_invalid_argument_naming_the_field_and_creates_nothing(
    writer: Client, fields: dict[str, Any], field: str
) -> None:
    error = refused(lambda: writer.submit(**fields))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in json.loads(trailing(error)["omniva-error-details"])
    assert not Job.objects.exists()


# --- status ---------------------------------------------------------------------------------


def test_get_task_status_shows_agent_executions_output_and_metrics(
    writer: Client, drain: Callable[..., Any]
) -> None:
    task_id = writer.submit(task_type="fan_out_fan_in", inputs=[json_input({"width": 2})]).task_id
    waiting = writer.status(task_id)
    drain()

    done = writer.status(task_id)

    assert waiting.status == pb.PENDING
    assert [(a.agent_id, a.stage_status) for a in waiting.agent_executions] == [
        ("split", "queued"),
        ("part_0", "waiting"),
        ("part_1", "waiting"),
        ("join", "waiting"),
    ]
    assert not waiting.HasField("output")
    assert done.status == pb.COMPLETED
    assert done.task_type == "fan_out_fan_in"
    assert done.progress_percent == 100
    assert json.loads(done.output.data) == {"parts": [0, 1], "sum_of_squares": 1}
    assert done.output.type == "json"
    assert not done.HasField("error")
    for execution in done.agent_executions:
        assert execution.status == pb.COMPLETED
        assert execution.agent_type == "default"
        assert execution.attempt == 1
        assert execution.worker
        assert execution.finished_at_ms >= execution.started_at_ms > 0
    join = done.agent_executions[-1]
    assert json.loads(join.output_json) == {"parts": [0, 1], "sum_of_squares": 1}
    assert done.metrics.agents_used == 4
    assert done.metrics.retry_count == 0
    assert done.metrics.attempts == 1
    assert done.metrics.total_duration_ms >= done.metrics.execution_time_ms
    assert done.metrics.total_duration_ms >= done.metrics.queue_time_ms


def test_a_failed_task_shows_its_error_and_its_retries(
    writer: Client, drain: Callable[..., Any], due: Callable[[Job], None]
) -> None:
    task_id = writer.submit(task_type="fail_n_times", inputs=[json_input({"n": 100})]).task_id
    job = Job.objects.get(pk=task_id)
    while job.status != JobStatus.FAILED:
        assert drain(), "an attempt ran"
        due(job)
        job.refresh_from_db()

    status = writer.status(task_id)

    retries = settings.OMNIVA_MAX_RETRIES
    assert status.status == pb.FAILED
    assert status.error.code == "TRANSIENT_FAILURE"
    assert status.error.agent_id == "flaky"
    assert status.agent_executions[0].status == pb.FAILED
    assert status.agent_executions[0].error.code == "TRANSIENT_FAILURE"
    assert status.metrics.retry_count == retries
    assert status.metrics.attempts == retries + 1


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-task"])
def test_an_unknown_task_is_not_found_for_every_call(writer: Client, task_id: str) -> None:
    for call in (
        lambda: writer.status(task_id),
        lambda: writer.stream(task_id),
        lambda: writer.cancel(task_id),
    ):
        error = refused(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert trailing(error)["omniva-error-code"] == ErrorCode.JOB_NOT_FOUND


@pytest.mark.parametrize("task_id", ["", "  ", "x" * 201])
def test_a_missing_or_overlong_task_id_is_invalid_argument(writer: Client, task_id: str) -> None:
    error = refused(lambda: writer.status(task_id))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- streams --------------------------------------------------------------------------------


def test_a_stream_sends_updates_as_they_happen_and_ends_after_completion(
    writer: Client, drain: Callable[..., Any]
) -> None:
    task_id = writer.submit(task_type="fan_out_fan_in", inputs=[json_input({"width": 2})]).task_id
    received: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for update in writer.stream(task_id):
                received.put(update)
        finally:
            received.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    first = received.get(timeout=CALL_TIMEOUT_S)
    assert first.kind == "job:update"
    assert first.status == pb.PENDING
    assert reader.is_alive()  # waiting for more while the task waits

    drain()
    reader.join(timeout=CALL_TIMEOUT_S)

    assert not reader.is_alive(), "the stream ends once the task has completed"
    updates = [first]
    while (update := received.get_nowait()) is not None:
        updates.append(update)
    sequences = [u.sequence for u in updates]
    assert sequences == sorted(set(sequences))
    assert updates[-1].status == pb.COMPLETED
    assert updates[-1].progress_percent == 100
    assert all(u.task_id == task_id for u in updates)
    finished_stages = {
        u.agent_id for u in updates if u.kind == "stage:update" and u.agent_status == "completed"
    }
    assert finished_stages == {"split", "part_0", "part_1", "join"}
    running = [u for u in updates if u.kind == "stage:update" and u.agent_status == "running"]
    assert all(u.status == pb.RUNNING for u in running)


def test_a_stream_resumes_after_a_sequence_with_only_the_later_updates(
    writer: Client, drain: Callable[..., Any]
) -> None:
    task_id = writer.submit(task_type="fan_out_fan_in", inputs=[json_input({"width": 2})]).task_id
    drain()
    everything = list(writer.stream(task_id))
    middle = len(everything) // 2

    resumed = list(writer.stream(task_id, after=everything[middle].sequence))
    by_metadata = list(
        writer.stream(task_id, extra=[("last-event-id", str(everything[middle].sequence))])
    )

    later = [(u.sequence, u.kind, u.agent_id, u.status) for u in everything[middle + 1 :]]
    assert [(u.sequence, u.kind, u.agent_id, u.status) for u in resumed] == later
    assert [(u.sequence, u.kind, u.agent_id, u.status) for u in by_metadata] == later
    # The task's status as of the resumed position, not only from the rows sent.
    assert resumed[0].status == everything[middle + 1].status


def test_a_stream_resumed_after_its_last_update_gets_the_final_state_once(
    writer: Client, drain: Callable[..., Any]
) -> None:
    task_id = writer.submit(task_type="noop").task_id
    drain()
    last = list(writer.stream(task_id))[-1]

    resumed = list(writer.stream(task_id, after=last.sequence))

    assert [(u.sequence, u.status) for u in resumed] == [(last.sequence, pb.COMPLETED)]


def test_a_stream_with_a_bad_last_event_id_is_invalid_argument(writer: Client) -> None:
    task_id = writer.submit(task_type="noop").task_id

    error = refused(lambda: writer.stream(task_id, extra=[("last-event-id", "soon")]))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_task_cancels_a_waiting_task_and_a_second_cancel_fails_its_precondition(
    writer: Client,
) -> None:
    task_id = writer.submit(task_type="sleep", inputs=[json_input({"seconds": 30})]).task_id

    cancelled = writer.cancel(task_id, reason="not needed")
    again = refused(lambda: writer.cancel(task_id))

    job = Job.objects.get(pk=task_id)
    assert cancelled.success
    assert cancelled.status == pb.CANCELLED
    assert job.status == JobStatus.CANCELLED
    assert job.cancel_reason == "not needed"
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert trailing(again)["omniva-error-code"] == ErrorCode.JOB_NOT_CANCELLABLE
    final = list(writer.stream(task_id))[-1]
    assert final.status == pb.CANCELLED


# --- auth -----------------------------------------------------------------------------------


def test_calls_without_a_valid_key_are_unauthenticated(
    make_key: Callable[..., KeyHandle], client_for: Callable[..., Client]
) -> None:
    revoked = make_key(Scope.ADMIN, name="revoked")
    core_services.api_key_revoke(name="revoked")
    task_id = str(services.job_submit(pipeline="noop")[0].pk)
    wrong = KeyHandle(revoked.key, "omv_000000000000_not-the-secret")

    for client in (client_for(None), client_for(wrong), client_for(revoked)):
        for call in (
            lambda client=client: client.submit(task_type="noop"),
            lambda client=client: client.status(task_id),
            lambda client=client: client.stream(task_id),
            lambda client=client: client.cancel(task_id),
        ):
            assert refused(call).code() == grpc.StatusCode.UNAUTHENTICATED
    assert Job.objects.count() == 1


def test_an_authorization_bearer_key_works_like_x_api_key(
    make_key: Callable[..., KeyHandle], client_for: Callable[..., Client]
) -> None:
    client = client_for(make_key(Scope.JOBS_WRITE, Scope.JOBS_READ), header="authorization")

    task_id = client.submit(task_type="noop").task_id

    assert client.status(task_id).status == pb.PENDING


def test_a_read_only_key_reads_but_cannot_submit_or_cancel(
    make_key: Callable[..., KeyHandle], client_for: Callable[..., Client]
) -> None:
    reader = client_for(make_key(Scope.JOBS_READ))
    task_id = str(services.job_submit(pipeline="noop")[0].pk)

    assert reader.status(task_id).status == pb.PENDING
    assert refused(lambda: reader.submit(task_type="noop")).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert refused(lambda: reader.cancel(task_id)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert Job.objects.get(pk=task_id).status == JobStatus.PENDING


def test_a_key_bound_to_a_project_submits_into_it_and_sees_no_other_projects_task(
    make_key: Callable[..., KeyHandle], client_for: Callable[..., Client]
) -> None:
    ours, theirs = Project.objects.create(name="ours"), Project.objects.create(name="theirs")
    bound = client_for(make_key(Scope.JOBS_READ, Scope.JOBS_WRITE, project=ours))
    admin = client_for(make_key(Scope.ADMIN))
    foreign = str(services.job_submit(pipeline="noop", project=theirs, idempotency_key="t-1")[0].pk)

    own = bound.submit(task_type="noop").task_id

    assert Job.objects.get(pk=own).project == ours
    for call in (
        lambda: bound.status(foreign),
        lambda: bound.status("t-1"),
        lambda: bound.stream(foreign),
        lambda: bound.cancel(foreign),
    ):
        assert refused(call).code() == grpc.StatusCode.NOT_FOUND
    reused = refused(lambda: bound.submit(task_id="t-1", task_type="noop"))
    assert reused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert admin.status(foreign).task_id == foreign
    assert Job.objects.get(pk=foreign).status == JobStatus.PENDING


def test_a_key_over_its_rate_limit_is_resource_exhausted_with_retry_after(
    writer: Client,
) -> None:
    with override_settings(OMNIVA_RATE_LIMIT=0.01, OMNIVA_RATE_BURST=1):
        writer.submit(task_type="noop")
        error = refused(lambda: writer.submit(task_type="noop"))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailing(error)["omniva-error-code"] == ErrorCode.RATE_LIMITED
    assert int(trailing(error)["retry-after"]) >= 1
    assert Job.objects.count() == 1


def test_a_saturated_queue_is_resource_exhausted(writer: Client) -> None:
    writer.submit(task_type="noop")
    services.queue_depths_forget()

    with override_settings(OMNIVA_QUEUE_LIMIT=1):
        error = refused(lambda: writer.submit(task_type="noop"))

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailing(error)["omniva-error-code"] == ErrorCode.QUEUE_SATURATED


def test_every_error_code_but_internal_error_has_a_status_other_than_internal() -> None:
    statuses = {code: grpc_service.grpc_status_for(code) for code in ErrorCode}

    assert [code for code, s in statuses.items() if s == grpc.StatusCode.INTERNAL] == [
        ErrorCode.INTERNAL_ERROR
    ]
    assert statuses[ErrorCode.CLIP_NOT_FOUND] == grpc.StatusCode.NOT_FOUND
    assert statuses[ErrorCode.CONFLICT] == grpc.StatusCode.FAILED_PRECONDITION
    assert statuses[ErrorCode.JOB_NOT_RETRYABLE] == grpc.StatusCode.FAILED_PRECONDITION
    assert statuses[ErrorCode.SERVICE_UNAVAILABLE] == grpc.StatusCode.UNAVAILABLE


def test_the_generated_code_imports_from_the_seeds_module_path() -> None:
    from grpc_services.generated import orchestrator_pb2, orchestrator_pb2_grpc

    assert orchestrator_pb2 is pb
    assert orchestrator_pb2_grpc.OrchestratorServiceStub is pb_grpc.OrchestratorServiceStub
    assert orchestrator_pb2.DESCRIPTOR.package == "orchestrator"


# --- processes: `manage.py grpcserver` beside a qcluster --------------------------------------


@dataclass
class RunningServer:
    port: int
    log: Path


@pytest.fixture(scope="module")
def grpcserver_with_worker(
    test_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """One grpcserver and one `default` qcluster for the module's process tests."""
    logs = tmp_path_factory.mktemp("grpcserver")
    group = ProcessGroup(process_env(DATABASE_URL=test_database_url))
    port = free_port()
    group.manage("grpcserver", "--port", str(port), log=logs / "grpcserver.log")
    group.manage("qcluster", env={"Q_CLUSTER_NAME": "default"}, log=logs / "qcluster.log")
    try:
        yield RunningServer(port, logs / "grpcserver.log")
    finally:
        group.stop_all()


@pytest.fixture
def process_client(
    grpcserver_with_worker: RunningServer,
    channel_to: Callable[[int], grpc.Channel],
    make_key: Callable[..., KeyHandle],
) -> Client:
    stub = pb_grpc.OrchestratorServiceStub(channel_to(grpcserver_with_worker.port))
    return Client(stub, [("x-api-key", make_key(Scope.JOBS_READ, Scope.JOBS_WRITE).secret)])


@pytest.mark.slow
def test_grpcserver_runs_a_task_streamed_live_to_completion(process_client: Client) -> None:
    task_id = process_client.submit(
        task_type="fan_out_fan_in", inputs=[json_input({"width": 3})]
    ).task_id

    updates = list(process_client.stream(task_id))
    status = process_client.status(task_id)

    assert updates[0].status == pb.PENDING
    assert updates[-1].status == pb.COMPLETED
    assert status.status == pb.COMPLETED
    assert json.loads(status.output.data) == {"parts": [0, 1, 2], "sum_of_squares": 5}
    workers = {a.worker.rsplit(":", 1)[1] for a in status.agent_executions}
    assert str(os.getpid()) not in workers


@pytest.mark.slow
def test_grpcserver_cancels_a_running_task_at_its_next_checkpoint(process_client: Client) -> None:
    task_id = process_client.submit(task_type="sleep", inputs=[json_input({"seconds": 60})]).task_id
    wait_for(
        lambda: process_client.status(task_id).status == pb.RUNNING,
        timeout=60,
        interval=0.2,
        what="the task to start",
    )

    cancel = process_client.cancel(task_id, reason="operator")
    final = list(process_client.stream(task_id))[-1]

    assert cancel.success
    assert cancel.status == pb.RUNNING  # stops at the stage's next checkpoint
    assert final.status == pb.CANCELLED
    status = process_client.status(task_id)
    assert status.cancel_reason == "operator"
    assert status.agent_executions[0].status == pb.CANCELLED


@pytest.mark.slow
def test_grpcserver_on_sigterm_ends_open_streams_unavailable_and_exits(
    processes: ProcessGroup,
    test_database_url: str,
    channel_to: Callable[[int], grpc.Channel],
    make_key: Callable[..., KeyHandle],
    tmp_path: Path,
) -> None:
    port = free_port()
    server = processes.manage(
        "grpcserver",
        "--port",
        str(port),
        env={"DATABASE_URL": test_database_url},
        log=tmp_path / "grpcserver.log",
    )
    client = Client(
        pb_grpc.OrchestratorServiceStub(channel_to(port)),
        [("x-api-key", make_key(Scope.JOBS_READ).secret)],
    )
    # On the gpu queue, which no worker serves: the task waits, so its stream stays open.
    task_id = str(services.job_submit(pipeline="embed_texts", params={"texts": ["hi"]})[0].pk)
    received: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for update in client.stream(task_id):
                received.put(update)
        except grpc.RpcError as error:
            received.put(error)

    threading.Thread(target=read, daemon=True).start()
    assert received.get(timeout=CALL_TIMEOUT_S).status == pb.PENDING

    server.send_signal(signal.SIGTERM)

    assert server.wait(timeout=30) == 0, (tmp_path / "grpcserver.log").read_text()
    while not isinstance(ending := received.get(timeout=CALL_TIMEOUT_S), grpc.RpcError):
        assert ending.status == pb.PENDING
    assert ending.code() == grpc.StatusCode.UNAVAILABLE
