"""`manage.py apikey create NAME [--scope S …] [--project ID]`, `list`, `revoke NAME`."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from omniva import services
from omniva.errors import OmnivaError
from omniva.models import ApiKey, Project, Scope


class Command(BaseCommand):
    help = "Create, list and revoke API keys."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        create = actions.add_parser(
            "create", help="Create a key; its secret is printed on the last line."
        )
        create.add_argument("name")
        create.add_argument(
            "--scope",
            action="append",
            dest="scopes",
            choices=Scope.values,
            help="Repeat for several scopes (default: admin).",
        )
        create.add_argument("--project", help="Bind the key to this project id.")
        actions.add_parser("list", help="List keys (never their secrets).")
        revoke = actions.add_parser("revoke", help="Revoke a key by name.")
        revoke.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except OmnivaError as exc:
            raise CommandError(exc.message) from None

    def _create(self, options: dict[str, Any]) -> None:
        project = None
        if options["project"]:
            try:
                project = Project.objects.get(pk=options["project"])
            except (Project.DoesNotExist, ValidationError):
                raise CommandError(f"No project with id {options['project']!r}.") from None
        key, secret = services.api_key_create(
            name=options["name"], scopes=options["scopes"] or [Scope.ADMIN], project=project
        )
        bound = f", bound to project {project.name}" if project else ""
        self.stdout.write(f"Created key {key.name!r} with scopes {', '.join(key.scopes)}{bound}.")
        self.stdout.write("Store it now; it is not shown again:")
        self.stdout.write(secret)

    def _list(self, options: dict[str, Any]) -> None:
        keys = ApiKey.objects.select_related("project")
        if not keys:
            self.stdout.write("No keys.")
            return
        rows = [("NAME", "PREFIX", "SCOPES", "PROJECT", "LAST USED", "STATE")]
        for key in keys:
            rows.append(
                (
                    key.name,
                    key.prefix,
                    ",".join(key.scopes),
                    key.project.name if key.project else "-",
                    key.last_used_at.strftime("%Y-%m-%d %H:%M") if key.last_used_at else "never",
                    "revoked" if key.revoked_at else "active",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write(
                "  ".join(
                    cell.ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )

    def _revoke(self, options: dict[str, Any]) -> None:
        key = services.api_key_revoke(name=options["name"])
        self.stdout.write(f"Revoked key {key.name!r}.")
