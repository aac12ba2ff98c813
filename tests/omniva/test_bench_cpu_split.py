"""bench queue's CPU split (omniva/bench/queue.py): which process's CPU counts as the
workers', the cluster's own or PostgreSQL's, read from real processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from omniva.bench.queue import cpu_seconds, postmaster_pid
from omniva.processes import die_with_parent
from tests.conftest import wait_for

# A process titled as django-q2 titles an idle worker, burning CPU until told to stop.
WORKER = """\
import pathlib, setproctitle, sys
setproctitle.setproctitle("qcluster Process-1:1 idle")
stop = pathlib.Path(sys.argv[1])
while not stop.exists():
    sum(range(10_000))
"""
# The cluster's main process: starts the worker and waits for it, using no CPU.
ROOT = """\
import subprocess, sys
subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]], check=False)
"""
NO_SUCH_PID = 2**22 + 7


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[psutil.Process]:
    stop = tmp_path / "stop"
    root = subprocess.Popen(
        [sys.executable, "-c", ROOT, WORKER, str(stop)], preexec_fn=die_with_parent
    )
    try:
        yield psutil.Process(root.pid)
    finally:
        stop.touch()
        root.wait(timeout=30)


def test_a_process_titled_as_a_worker_counts_as_the_workers_and_its_parent_as_the_cluster(
    cluster: psutil.Process,
) -> None:
    root = cluster

    def burning_worker() -> psutil.Process | None:
        children = root.children()
        if children and " idle" in " ".join(children[0].cmdline()):
            return children[0]
        return None

    worker = wait_for(burning_worker, timeout=30)
    before = cpu_seconds(root.pid, NO_SUCH_PID)
    wait_for(lambda: sum(worker.cpu_times()[:2]) > 0.5, timeout=60)
    after = cpu_seconds(root.pid, NO_SUCH_PID)

    assert after["workers"] - before["workers"] > 0.2
    assert after["cluster"] - before["cluster"] < 0.1
    assert after["postgres"] == before["postgres"] == 0.0


@pytest.mark.django_db
def test_the_postmaster_is_found_from_the_servers_data_directory() -> None:
    server = psutil.Process(postmaster_pid())
    assert server.name() in {"postgres", "postmaster"}
    assert server.children(), "a postmaster has its backends and background workers"
