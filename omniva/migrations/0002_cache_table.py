"""The table of Django's database cache (django-q2 keeps its cluster stats there)."""

from __future__ import annotations

from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor) -> None:
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


def drop_cache_table(apps, schema_editor) -> None:
    schema_editor.execute("DROP TABLE IF EXISTS omniva_cache")


class Migration(migrations.Migration):
    dependencies = [("omniva", "0001_initial")]

    operations = [migrations.RunPython(create_cache_table, drop_cache_table)]
