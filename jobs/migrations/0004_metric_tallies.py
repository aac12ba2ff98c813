from __future__ import annotations

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    # The index is built without locking out writes: the table may hold many runs.
    atomic = False

    dependencies = [
        ("jobs", "0003_retention_schedule"),
    ]

    operations = [
        migrations.CreateModel(
            name="MetricCursor",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("through", models.DateTimeField()),
            ],
        ),
        migrations.CreateModel(
            name="MetricTally",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("kind", models.CharField(max_length=20)),
                ("labels", models.JSONField()),
                ("count", models.BigIntegerField(default=0)),
                ("total_s", models.FloatField(default=0.0)),
                ("buckets", models.JSONField(default=list)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("kind", "labels"), name="jobs_metrictally_unique"
                    )
                ],
            },
        ),
        AddIndexConcurrently(
            model_name="stagerun",
            index=models.Index(fields=["finished_at"], name="jobs_stagerun_finished"),
        ),
    ]
