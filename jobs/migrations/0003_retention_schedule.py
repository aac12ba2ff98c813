"""The django-q2 schedule of the retention pass (jobs.services.retention_run): every ten
minutes in the default cluster, whose guard fires due schedules. Made once: a schedule an
operator changed in the admin (its interval, or switched off with repeats 0) is kept."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import migrations
from django.utils import timezone

# As jobs.services names them (a migration does not import the app's code).
NAME = "omniva:retention"
FUNC = "jobs.tasks.retention_run"
EVERY_MIN = 10


def create(apps: Any, schema_editor: Any) -> None:
    schedule = apps.get_model("django_q", "Schedule")
    if schedule.objects.filter(name=NAME).exists():
        return
    schedule.objects.create(
        name=NAME,
        func=FUNC,
        schedule_type="I",  # Schedule.MINUTES
        minutes=EVERY_MIN,
        repeats=-1,
        next_run=timezone.now() + timedelta(minutes=EVERY_MIN),
    )


def remove(apps: Any, schema_editor: Any) -> None:
    apps.get_model("django_q", "Schedule").objects.filter(name=NAME, func=FUNC).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0002_gpu_worker_report"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [migrations.RunPython(create, remove)]
