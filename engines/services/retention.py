"""Pruning finished events (the retention pass)."""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from engines.models import EventStatus
from engines.selectors import event_engine_types
from omniva.services import prune_in_batches

# One engine type's events of one final status, oldest first along the finished index
# (omniva.services.prune_in_batches runs it).
_PRUNE_SQL = """
WITH deleted AS (
    DELETE FROM engines_event WHERE id = ANY(ARRAY(
        SELECT id FROM engines_event
        WHERE engine_type = %(engine_type)s AND status = %(status)s
          AND finished_at >= %(after)s AND finished_at < %(before)s
        ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    ))
    RETURNING finished_at
)
SELECT count(*), max(finished_at) FROM deleted
"""


def events_prune(*, older_than: timedelta, deadline: float | None = None) -> int:
    """Delete the completed and dead-lettered events that finished over `older_than`
    ago, in batches; how many."""
    before = timezone.now() - older_than
    deleted = 0
    for engine_type in event_engine_types():
        for status in (EventStatus.COMPLETED, EventStatus.DEAD_LETTERED):
            deleted += prune_in_batches(
                sql=_PRUNE_SQL,
                params={"engine_type": engine_type, "status": str(status), "before": before},
                deadline=deadline,
            )
    return deleted
