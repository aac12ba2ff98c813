from __future__ import annotations

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    # Built without locking out writes: the table may hold many events already.
    atomic = False

    dependencies = [
        ("engines", "0003_event_claimed_by_and_deadline"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="event",
            index=models.Index(
                condition=models.Q(("status__in", ["completed", "dead_lettered"])),
                fields=["engine_type", "status", "finished_at"],
                name="engines_event_finished",
            ),
        ),
    ]
