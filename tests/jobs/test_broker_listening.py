"""Only a broker connection that waits listens: one that listens and does not read holds
up PostgreSQL's one NOTIFY queue for every session, until every notifying commit fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from jobs.broker import PostgresBroker, channel_for, enqueue_payload

pytestmark = pytest.mark.django_db(transaction=True)


def _listening(broker: PostgresBroker) -> list[str]:
    conn = broker._db()
    return [row[0] for row in conn.execute("SELECT pg_listening_channels()").fetchall()]


def _buffered(broker: PostgresBroker) -> list[Any]:
    return list(broker._db().notifies(timeout=0))


@pytest.fixture
def broker() -> Iterator[PostgresBroker]:
    broker = PostgresBroker(list_key="default")
    yield broker
    if broker._conn is not None:
        broker._conn.close()


def test_the_broker_listens_only_while_its_pusher_waits_and_keeps_nothing_unread(
    broker: PostgresBroker,
) -> None:
    assert broker.ping()  # the sentinel's start-up ping: a connection it never reads
    broker.claim(5)
    assert _listening(broker) == []

    # A pusher waits on an empty queue; a task enqueued meanwhile wakes it at once.
    found: list[Any] = []
    waiting = threading.Thread(target=lambda: found.append(broker.dequeue()))
    started = time.monotonic()
    waiting.start()
    time.sleep(0.2)  # let it reach its wait (the wake-up is what is measured)
    enqueue_payload(queue="default", payload="task")
    waiting.join(timeout=10)
    assert found[0] is not None
    assert [payload for _, payload in found[0]] == ["task"]
    assert time.monotonic() - started < 0.9  # woken, not the 1 s fallback poll

    # Busy now (pushing what it claimed): it no longer listens, and what is enqueued
    # meanwhile piles up neither in its session nor in its client.
    assert _listening(broker) == []
    for _ in range(100):
        enqueue_payload(queue="default", payload="more")
    assert _buffered(broker) == []
    assert channel_for("default") not in _listening(broker)
