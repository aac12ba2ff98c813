"""`manage.py bench soak` (omniva/bench/soak.py), shortened to seconds.

As a real process against the test database, it starts the platform, holds its load and
prints a table whose rows are every process of the platform: daphne, grpcserver, the
engine, and each `qcluster` with the processes it forks (sentinel, workers, monitor,
pusher), each with its memory figures and verdict; every job ends as its pipeline
should and no job is lost. The verdict itself: a process that grew over its bound, or
exited during the soak, fails with a line naming it; growth under the bound does not.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings

from omniva.bench.soak import MIB, Track, growth_bound, judge
from tests.conftest import ProcessGroup, wait_for

ROW = re.compile(
    r"^(?P<label>\S.*?)\s{2,}(?P<pid>\d+)\s+(?P<warm>[\d.]+)\s+(?P<max>[\d.]+)\s+"
    r"(?P<end>[\d.]+)\s+(?P<growth>[+-][\d.]+)\s+[+-][\d.]+\s+[\d.]+\s+\S*\s*"
    r"\d+->\d+\s+(?P<verdict>\S+)$"
)
JOBS = re.compile(
    r"^jobs: submitted (?P<submitted>\d+), accepted (?P<accepted>\d+), "
    r"completed (?P<completed>\d+), failed (?P<failed>\d+), jobs_lost (?P<lost>\d+), "
    r"unexpected (?P<unexpected>\d+)"
)
MISSED = re.compile(r"final updates missed (?P<missed>\d+); API reads \d+; API errors (?P<e>\d+)")
DEFAULT_WORKERS = 1
GPU_WORKERS = 1


def expected_processes() -> set[str]:
    """Every process `make run` runs (and the engine), as the table names them."""
    names = {"daphne", "grpcserver", "run_engine echo"}
    for queue in settings.OMNIVA_QUEUES:
        workers = GPU_WORKERS if queue == "gpu" else DEFAULT_WORKERS
        cluster = f"qcluster {queue}"
        names |= {cluster, *(f"{cluster}: {role}" for role in ("sentinel", "monitor", "pusher"))}
        names |= {f"{cluster}: worker {n}" for n in range(1, workers + 1)}
    return names


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_short_soak_lists_every_process_with_its_memory_and_loses_no_job(
    processes: ProcessGroup,
    test_database_url: str,
    tmp_path: Path,
    fault_report: Callable[..., None],
) -> None:
    log = tmp_path / "bench.log"
    bench = processes.manage(
        "bench", "soak",
        "--soak-s", "8", "--soak-warmup-s", "4", "--soak-sample-s", "1",
        "--soak-rate", "5", "--soak-ws-clients", "3", "--soak-reads", "3",
        "--workers", str(DEFAULT_WORKERS),
        env={"DATABASE_URL": test_database_url, "OMNIVA_GPU_WORKERS": str(GPU_WORKERS)},
        log=log,
    )  # fmt: skip
    wait_for(lambda: bench.poll() is not None, timeout=270, interval=0.5, what="bench soak")
    output = log.read_text(errors="replace")
    assert bench.returncode == 0, output[-5000:]

    rows = {m["label"]: m for line in output.splitlines() if (m := ROW.match(line))}
    assert expected_processes() <= set(rows), (sorted(rows), output[-5000:])
    for label in expected_processes():
        assert rows[label]["verdict"] == "ok", rows[label].string
        # A real process's RSS, sampled at the warm-up's end and at the soak's.
        assert float(rows[label]["warm"]) > 10, rows[label].string
        assert float(rows[label]["end"]) > 10, rows[label].string
    jobs = next(m for line in output.splitlines() if (m := JOBS.match(line)))
    missed = MISSED.search(output)
    assert missed is not None, output[-3000:]
    counts = {name: int(value) for name, value in jobs.groupdict().items()}
    fault_report(
        processes=len(rows),
        submitted=counts["submitted"],
        accepted=counts["accepted"],
        completed=counts["completed"],
        failed=counts["failed"],
        jobs_lost=counts["lost"],
        unexpected=counts["unexpected"],
        updates_missed=int(missed["missed"]),
        api_errors=int(missed["e"]),
    )
    assert counts["submitted"] == counts["accepted"] >= 20
    assert counts["completed"] + counts["failed"] == counts["accepted"]
    assert counts["lost"] == counts["unexpected"] == 0
    assert int(missed["missed"]) == int(missed["e"]) == 0
    assert "verdict: pass" in output


def track(rss_mib: list[float], *, start: float = 0.0, gone_at: float | None = None) -> Track:
    """A process sampled every 30 s from `start`."""
    times = [start + 30.0 * i for i in range(len(rss_mib))]
    return Track(
        "daphne",
        4242,
        times=times,
        rss=[int(v * MIB) for v in rss_mib],
        fds=[10] * len(times),
        gone_at=gone_at,
    )


def test_the_bound_is_64_mib_or_a_quarter_of_the_warm_up_rss_whichever_is_larger() -> None:
    assert growth_bound(100 * MIB) == 64 * MIB
    assert growth_bound(1000 * MIB) == 250 * MIB


def test_a_process_that_grew_over_its_bound_fails_with_a_line_naming_it() -> None:
    # The warm-up ends at 60 s, the soak at 180 s: 120 MiB, then 190.
    verdict = judge(track([100, 110, 120, 140, 160, 170, 190]), warmed_at=60, ended_at=180)
    assert (verdict.warm, verdict.end, verdict.peak) == (120 * MIB, 190 * MIB, 190 * MIB)
    assert verdict.failed
    assert "daphne (pid 4242) grew 70.0 MiB (+58%) from 120.0 MiB" in verdict.why()
    assert verdict.trend_mib_per_h is not None
    assert verdict.trend_mib_per_h > 0


def test_growth_before_the_warm_up_ends_or_under_the_bound_passes() -> None:
    verdict = judge(track([50, 200, 230, 240, 250, 260, 250]), warmed_at=60, ended_at=180)
    assert verdict.growth == 20 * MIB
    assert not verdict.failed


def test_a_process_that_exited_during_the_soak_fails() -> None:
    verdict = judge(track([100, 100, 100, 100], gone_at=120), warmed_at=60, ended_at=180)
    assert verdict.exited
    assert verdict.failed
    assert "exited 120 s into the load" in verdict.why()


def test_a_process_that_started_after_the_warm_up_is_measured_from_its_first_sample() -> None:
    verdict = judge(track([300, 310, 320], start=90), warmed_at=60, ended_at=180)
    assert verdict.started_late
    assert verdict.warm == 300 * MIB
    assert not verdict.failed
