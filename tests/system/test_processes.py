"""omniva.processes, the one process harness, with real child processes: stopping kills
what ignores SIGTERM (and what it forked) once the grace is over, a wait fails as soon
as its process exits (with its log's tail), and children die with their parent."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from omniva.processes import (
    ManagedProcess,
    ProcessFailed,
    django_env,
    free_port,
    http_status,
)
from tests.conftest import REPO_ROOT, wait_for

pytestmark = pytest.mark.slow


def python(code: str, log: Path, *, name: str = "the child") -> ManagedProcess:
    return ManagedProcess(
        [sys.executable, "-c", code], env=django_env(), log_path=log, name=name, cwd=REPO_ROOT
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_ignoring_sigterm_is_killed_with_what_it_forked_once_the_grace_is_over(
    tmp_path: Path,
) -> None:
    # The disposition is inherited: the grandchild ignores SIGTERM too.
    child = python(
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "forked = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('forked', forked.pid, flush=True)\n"
        "time.sleep(60)\n",
        tmp_path / "child.log",
    ).start()
    line = child.wait_until(
        lambda: next((x for x in child.log_tail().splitlines() if x.startswith("forked")), None),
        what="fork",
        timeout_s=30,
    )
    grandchild = int(line.split()[1])
    grace_s = 1.0

    started = time.monotonic()
    code = child.stop(grace_s=grace_s)
    took = time.monotonic() - started

    assert code == -signal.SIGKILL  # SIGTERM was ignored: killed
    assert took >= grace_s  # not before the grace
    assert took < grace_s + 5
    wait_for(lambda: gone(grandchild), timeout=5, what="the grandchild to be killed")
    assert not child.running


def test_a_child_that_stops_on_sigterm_is_not_killed(tmp_path: Path) -> None:
    child = python(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n",
        tmp_path / "child.log",
    ).start()
    child.wait_until(lambda: "ready" in child.log_tail(), what="start", timeout_s=30)

    started = time.monotonic()
    code = child.stop(grace_s=30)

    assert code == 7  # its own exit on SIGTERM, not SIGKILL
    assert time.monotonic() - started < 10


def test_a_wait_fails_as_soon_as_its_process_exits_with_the_log_tail(tmp_path: Path) -> None:
    child = python(
        "import sys, time\nprint('no database here', flush=True)\ntime.sleep(0.5)\nsys.exit(3)\n",
        tmp_path / "child.log",
        name="the failing child",
    ).start()

    started = time.monotonic()
    with pytest.raises(ProcessFailed) as failed:
        child.wait_until(lambda: False, what="get ready", timeout_s=60)

    assert time.monotonic() - started < 15  # not the 60 s of the timeout
    message = str(failed.value)
    assert "the failing child exited with code 3" in message
    assert "no database here" in message
    child.stop()


def test_a_wait_that_times_out_names_what_it_waited_for_with_the_log_tail(
    tmp_path: Path,
) -> None:
    child = python(
        "import time\nprint('still starting', flush=True)\ntime.sleep(60)\n",
        tmp_path / "child.log",
        name="the slow child",
    ).start()
    try:
        child.wait_until(lambda: "still starting" in child.log_tail(), what="log", timeout_s=30)
        with pytest.raises(ProcessFailed) as failed:
            child.wait_until(lambda: False, what="answer", timeout_s=0.5)
    finally:
        child.stop(grace_s=5)

    assert "the slow child did not answer within 0.5 s" in str(failed.value)
    assert "still starting" in str(failed.value)


def test_wait_answering_returns_once_the_port_answers_http(tmp_path: Path) -> None:
    port = free_port()
    server = ManagedProcess(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        env=django_env(),
        log_path=tmp_path / "http.log",
        name="http.server",
        cwd=tmp_path,
    )
    with server:
        server.wait_answering(port, "/", status=200, timeout_s=30)

        assert http_status(port, "/") == 200
    assert not server.running


def test_children_die_with_their_parent_even_when_it_is_killed(tmp_path: Path) -> None:
    """The parent (itself a harness child) starts a child and is SIGKILLed: the child
    gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and exits."""
    pid_file = tmp_path / "child.pid"
    child_code = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from omniva.processes import ManagedProcess, django_env\n"
        f"argv = [sys.executable, '-c', {json.dumps(child_code)}]\n"
        f"ManagedProcess(argv, env=django_env(), cwd=Path({str(tmp_path)!r})).start()\n"
        "time.sleep(60)\n"
    )
    parent = python(parent_code, tmp_path / "parent.log", name="the parent").start()
    child_pid = parent.wait_until(
        lambda: pid_file.exists() and pid_file.read_text().strip(), what="start", timeout_s=30
    )
    child_pid = int(child_pid)
    assert not gone(child_pid)

    assert parent.popen is not None
    os.kill(parent.popen.pid, signal.SIGKILL)  # the leader only: not its group
    parent.popen.wait(timeout=10)

    wait_for(lambda: gone(child_pid), timeout=10, what="the orphaned child to exit")
    parent.stop()
