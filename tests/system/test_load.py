"""Load: 10,000 jobs through the HTTP API of a real daphne, run by real `qcluster` workers.

Twenty clients, each a thread with one keep-alive connection, submit 10,000 jobs with
`POST /v1/jobs`, one job per request, at mixed priorities (numbers and words); one
job in fifty fails on purpose (`fail_n_times` with no retries), the rest are `noop`.
A `qcluster` runs them while they are being submitted. Proved:

- every request is answered 202 with a job at the priority asked for;
- none is lost: every accepted id is in the database and ended, as its pipeline says
  (completed or failed), and the database holds no job that was not accepted;
- `GET /v1/metrics`, the Prometheus exposition at `/metrics` and the database agree on
  the total, each status, and each pipeline's submitted and finished counts;
- none ran twice: each job's only stage ran one attempt, and the activity outbox (one
  row per state change, written in the transaction that made it) holds one start of
  that stage and one final transition of the job.

The rate limit and the queue's saturation limit are raised for these processes: they would
refuse this load by design (tests/omniva/test_throttling.py and tests/jobs/test_api.py
prove them), and the point here is that everything accepted is run exactly once.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.db.models import Count, Q
from prometheus_client.parser import text_string_to_metric_families

from jobs.models import PRIORITY_WORDS, Job, JobStatus, QueueTask, StageRun
from omniva.models import Activity
from tests.conftest import (
    KeyHandle,
    ProcessGroup,
    Server,
    free_port,
    http_get,
    start_daphne,
    start_worker,
    wait_for,
)
from tests.jobs.conftest import (  # noqa: F401 (the autouse fixtures of tests/jobs/)
    fresh_saturation_cache,
    stop_job_listener,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

JOBS = 10_000
CLIENTS = 20
FAIL_EVERY = 50  # one job in fifty fails on purpose
PRIORITIES: list[int | str] = [*range(11), *PRIORITY_WORDS]
REQUEST_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240


def job_body(index: int) -> dict[str, Any]:
    priority = PRIORITIES[index % len(PRIORITIES)]
    if index % FAIL_EVERY == 0:
        # Its first attempt raises a transient error, and no retry is left: failed at once.
        return {
            "pipeline": "fail_n_times",
            "params": {"n": 1},
            "max_retries": 0,
            "priority": priority,
        }
    return {"pipeline": "noop", "priority": priority}


def asked_priority(body: dict[str, Any]) -> int:
    value = body["priority"]
    return PRIORITY_WORDS[value] if isinstance(value, str) else value


@dataclass
class Answer:
    index: int  # which job of job_body's
    status: int
    data: dict[str, Any]  # the envelope's data, or the whole envelope of an error
    latency_s: float


def submit_all(server: Server, secret: str, indexes: range, stop: threading.Event) -> list[Answer]:
    """One client: its jobs one request at a time on one keep-alive connection."""
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(
        address.hostname, address.port, timeout=REQUEST_TIMEOUT_S
    )
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    answers = []
    try:
        for index in indexes:
            if stop.is_set():  # the test gave up (a timeout): stop loading the machine
                break
            sent = time.monotonic()
            connection.request("POST", "/v1/jobs", json.dumps(job_body(index)), headers)
            response = connection.getresponse()
            envelope = json.loads(response.read())
            answers.append(
                Answer(
                    index,
                    response.status,
                    envelope.get("data") or envelope,
                    time.monotonic() - sent,
                )
            )
    finally:
        connection.close()
    return answers


def submit_concurrently(server: Server, secret: str) -> list[Answer]:
    """JOBS jobs from CLIENTS clients at once; client i sends jobs i, i + CLIENTS, …"""
    stop = threading.Event()
    with ThreadPoolExecutor(CLIENTS) as pool:
        try:
            clients = [
                pool.submit(submit_all, server, secret, range(i, JOBS, CLIENTS), stop)
                for i in range(CLIENTS)
            ]
            return [answer for client in clients for answer in client.result()]
        finally:
            stop.set()


def prometheus_samples(server: Server) -> dict[str, dict[tuple, float]]:
    """Each sample of /metrics by name, then by its labels (sorted (name, value) pairs)."""
    answer = http_get(f"{server.url}/metrics")
    assert answer.status == 200, answer.body[:500]
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


# About 3.5 minutes on a 2-core machine with little else running, 5 when it is busy: the
# daphne's CPU is the bound (about 40 submissions a second). Above the suite's 300 s.
@pytest.mark.timeout(600)
def test_ten_thousand_jobs_from_twenty_clients_all_end_once_and_every_count_agrees(
    processes: ProcessGroup,
    test_database_url: str,
    admin_key: KeyHandle,
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    processes.base_env.update(OMNIVA_RATE_LIMIT="1000000", OMNIVA_QUEUE_LIMIT=str(10 * JOBS))
    server = start_daphne(processes, test_database_url, free_port(), tmp_path / "daphne.log")
    worker = start_worker(processes, test_database_url, tmp_path / "qcluster.log")

    def logs() -> str:
        return (
            f"--- daphne\n{server.output()}\n"
            f"--- qcluster\n{(tmp_path / 'qcluster.log').read_text(errors='replace')[-3000:]}"
        )

    started = time.monotonic()
    answers = submit_concurrently(server, admin_key.secret)
    submit_s = time.monotonic() - started

    refused = [(a.index, a.status, a.data) for a in answers if a.status != 202]
    assert not refused, f"{len(refused)} submissions not accepted, e.g. {refused[:3]}"
    wrong_priority = [
        (a.index, a.data["priority"])
        for a in answers
        if a.data["priority"] != asked_priority(job_body(a.index))
    ]
    assert not wrong_priority, f"jobs at another priority than asked: {wrong_priority[:5]}"
    accepted = {a.data["id"]: a.index for a in answers}
    assert len(accepted) == JOBS, "two submissions were answered with the same job"
    expected_failed = {i for i in range(JOBS) if i % FAIL_EVERY == 0}

    def ended() -> bool:
        assert worker.poll() is None, logs()
        return Job.objects.filter(finished_at__isnull=False).count() >= JOBS

    wait_for(ended, timeout=RUN_TIMEOUT_S, interval=0.5, what=f"every job to end\n{logs()}")
    run_s = time.monotonic() - started

    # The database: every accepted job, nothing else, each ended as its pipeline says.
    final = {str(job_id): status for job_id, status in Job.objects.values_list("id", "status")}
    lost = [job_id for job_id in accepted if final.get(job_id) is None]
    unknown = [job_id for job_id in final if job_id not in accepted]
    wrong_end = [
        (job_id, status)
        for job_id, status in final.items()
        if job_id in accepted
        and status
        != (JobStatus.FAILED if accepted[job_id] in expected_failed else JobStatus.COMPLETED)
    ]
    by_status = Counter(final.values())

    # Ran twice: a second attempt of a stage, a second start of it in the outbox, or a
    # job that reached a final status twice.
    second_attempts = set(StageRun.objects.exclude(attempt=1).values_list("job_id", flat=True))
    restarted = set(
        Activity.objects.filter(kind="stage:update", data__status="running")
        .values("job_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .values_list("job_id", flat=True)
    )
    finished_twice = set(
        Activity.objects.filter(
            kind="job:update", data__status__in=[JobStatus.COMPLETED, JobStatus.FAILED]
        )
        .values("job_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .values_list("job_id", flat=True)
    )
    ran_twice = second_attempts | restarted | finished_twice
    starts = Activity.objects.filter(kind="stage:update", data__status="running").count()

    latencies = sorted(a.latency_s for a in answers)
    fault_report(
        submitted=len(answers),
        accepted=len(accepted),
        completed=by_status[JobStatus.COMPLETED],
        failed=by_status[JobStatus.FAILED],
        jobs_lost=len(lost),
        ran_twice=len(ran_twice),
        submissions_per_s=round(JOBS / submit_s),
        latency_p50_ms=round(1000 * latencies[len(latencies) // 2]),
        latency_p99_ms=round(1000 * latencies[len(latencies) * 99 // 100]),
        submit_s=round(submit_s),
        run_s=round(run_s),
    )
    assert not lost, f"{len(lost)} accepted jobs are not in the database, e.g. {lost[:3]}"
    assert not unknown, f"{len(unknown)} jobs nobody was answered for, e.g. {unknown[:3]}"
    assert not wrong_end, f"{len(wrong_end)} jobs ended otherwise than expected: {wrong_end[:5]}"
    assert by_status == {
        JobStatus.COMPLETED: JOBS - len(expected_failed),
        JobStatus.FAILED: len(expected_failed),
    }
    assert not ran_twice, f"{len(ran_twice)} jobs ran twice, e.g. {sorted(map(str, ran_twice))[:3]}"
    assert starts == JOBS, f"{starts} stage starts for {JOBS} one-stage jobs"
    assert not QueueTask.objects.exists(), "every delivery is acknowledged"

    # /v1/metrics agrees with the database.
    answer = http_get(
        f"{server.url}/v1/metrics", headers={"Authorization": f"Bearer {admin_key.secret}"}
    )
    assert answer.status == 200, answer.body[:500]
    metrics = answer.json()["data"]
    statuses = [s.value for s in JobStatus]
    assert {s: metrics["jobs"][s] for s in statuses} == {s: by_status[s] for s in statuses}
    assert metrics["jobs"]["total"] == JOBS
    assert metrics["jobs"]["success_rate"] == round((JOBS - len(expected_failed)) / JOBS, 4)
    assert metrics["queues"]["default"]["depth"] == 0

    # So does the Prometheus exposition, per pipeline and status.
    samples = prometheus_samples(server)
    per_pipeline = dict(Job.objects.values_list("pipeline").annotate(n=Count("id")))
    finished = {
        (row["pipeline"], row["status"]): row["n"]
        for row in Job.objects.values("pipeline", "status").annotate(
            n=Count("id", filter=Q(finished_at__isnull=False))
        )
    }
    assert samples["omniva_jobs_submitted_total"] == {
        (("pipeline", pipeline),): float(n) for pipeline, n in per_pipeline.items()
    }
    assert samples["omniva_jobs_finished_total"] == {
        (("pipeline", pipeline), ("status", status)): float(n)
        for (pipeline, status), n in finished.items()
    }
    assert samples["omniva_job_duration_seconds_count"] == {
        (("pipeline", "noop"),): float(by_status[JobStatus.COMPLETED])
    }
    assert samples["omniva_queue_depth"][(("queue", "default"),)] == 0
