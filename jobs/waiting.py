"""Waiting for a job to finish: one LISTEN per process, many waiters.

Every transition that finishes a job NOTIFYs `omniva_job_done` with the job's id in its
transaction (jobs/services.py). A process that serves sync submissions keeps one
listener thread on its own connection and wakes the waiters of that id. A waiter checks
the row after registering and before sleeping, so a job that finished in between is
not missed; it also re-reads the row every few seconds in case the listener was
reconnecting when the notification went out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

import psycopg

from jobs.broker import own_connection_params
from jobs.models import Job
from jobs.services import JOB_DONE_CHANNEL

logger = logging.getLogger("omniva.jobs.waiting")

RECHECK_S = 5.0
STOP_CHECK_S = 1.0


class JobDoneListener:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = defaultdict(set)
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._params: dict[str, Any] | None = None
        self._stopping = threading.Event()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._params = own_connection_params()
            self._thread = threading.Thread(target=self._run, name="job-done-listener", daemon=True)
            self._thread.start()
        self._listening.wait(timeout=5)

    def stop(self) -> None:
        """Stop listening (tests; a server's listener lives as long as its process)."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout=5)
        self._thread = None
        self._stopping.clear()
        self._listening.clear()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with psycopg.connect(**(self._params or {}), autocommit=True) as conn:
                    conn.execute(f'LISTEN "{JOB_DONE_CHANNEL}"')
                    self._listening.set()
                    self._wake_all()  # anything that finished while we were reconnecting
                    while not self._stopping.is_set():
                        for notify in conn.notifies(timeout=STOP_CHECK_S):
                            self._wake(notify.payload)
            except psycopg.Error as exc:
                self._listening.clear()
                logger.warning("job listener lost its connection (%s)", exc.__class__.__name__)
                time.sleep(0.5)

    def _wake(self, job_id: str) -> None:
        with self._lock:
            for event in self._waiters.get(job_id, ()):
                event.set()

    def _wake_all(self) -> None:
        with self._lock:
            for events in self._waiters.values():
                for event in events:
                    event.set()

    def wait(self, job_id: str, timeout_s: float) -> Job:
        """The job once it finished, or as it stands when `timeout_s` ran out."""
        self._ensure_started()
        event = threading.Event()
        with self._lock:
            self._waiters[job_id].add(event)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                job = Job.objects.get(pk=job_id)
                remaining = deadline - time.monotonic()
                if job.is_finished or remaining <= 0:
                    return job
                event.wait(min(remaining, RECHECK_S))
                event.clear()
        finally:
            with self._lock:
                self._waiters[job_id].discard(event)
                if not self._waiters[job_id]:
                    del self._waiters[job_id]


listener = JobDoneListener()


def wait_for_job(job_id: Any, *, timeout_s: float) -> Job:
    return listener.wait(str(job_id), timeout_s)
