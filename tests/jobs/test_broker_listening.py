"""Only a broker connection that waits listens: one that listens and does not read holds
up PostgreSQL's one NOTIFY queue for every session, until every notifying commit fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections

from jobs import broker as broker_module
from jobs import fetching
from jobs.broker import PostgresBroker, channel_for, enqueue_payload
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _listening(broker: PostgresBroker) -> list[str]:
    conn = broker._db()
    return [row[0] for row in conn.execute("SELECT pg_listening_channels()").fetchall()]


def _waiting_for_notifications(broker: PostgresBroker) -> bool:
    """Whether the broker's session, seen from another, is idle after asking when the
    next delayed task is due: the last thing the pusher does before it waits."""
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT state, query FROM pg_stat_activity WHERE pid = %s",
            [broker._conn.info.backend_pid if broker._conn else -1],
        )
        row = cursor.fetchone()
    return row is not None and row[0] == "idle" and "min(visible_at)" in row[1]


def _buffered(broker: PostgresBroker) -> list[Any]:
    return list(broker._db().notifies(timeout=0))


@pytest.fixture
def broker() -> Iterator[PostgresBroker]:
    """The broker of a cluster with one worker waiting (the pusher claims by demand)."""
    broker = PostgresBroker(list_key="default")
    fetching.READY_WORKERS.spawned()  # its dequeue takes it
    yield broker
    if broker._conn is not None:
        broker._conn.close()


def test_the_broker_listens_only_while_its_pusher_waits_and_keeps_nothing_unread(
    broker: PostgresBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert broker.ping()  # the sentinel's start-up ping: a connection it never reads
    broker.claim(5)
    assert _listening(broker) == []

    # A pusher waits on an empty queue; a task enqueued meanwhile wakes it. (The fallback
    # poll is made longer than the join below: only the wake-up can end the wait in time.)
    monkeypatch.setattr(broker_module, "FALLBACK_POLL_S", 60.0)
    found: list[Any] = []
    waiting = threading.Thread(target=lambda: found.append(broker.dequeue()))
    waiting.start()
    wait_for(lambda: _waiting_for_notifications(broker), what="the pusher to wait")
    enqueue_payload(queue="default", payload="task")
    waiting.join(timeout=20)
    assert not waiting.is_alive()
    assert found[0] is not None
    assert [payload for _, payload in found[0]] == ["task"]

    # Busy now (pushing what it claimed): it no longer listens, and what is enqueued
    # meanwhile piles up neither in its session nor in its client.
    assert _listening(broker) == []
    for _ in range(100):
        enqueue_payload(queue="default", payload="more")
    assert _buffered(broker) == []
    assert channel_for("default") not in _listening(broker)
