"""django-q2 entry points of publishing: what django-q2's scheduler queues."""

from __future__ import annotations

from typing import Any

from publishing import services


def schedule_fire(schedule_id: str, intended_at: str | None = None, **_: Any) -> str | None:
    """A schedule's run came due: submit its job (publishing.services.schedule_fire)."""
    job = services.schedule_fire(schedule_id=schedule_id, intended_at=intended_at)
    return None if job is None else str(job.pk)
