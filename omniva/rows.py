"""Model instances from fixed SQL, for the hottest reads.

An ORM query compiles its SQL on every call, and a raw query (`Model.objects.raw`)
maps its result's columns onto the model's fields on every call too; for the API's
most frequent read (a job with its stages) those two were most of the request's CPU
(docs/benchmarks.md). `ModelRows` does that work once per model: it selects the
model's concrete columns in a fixed order and builds instances from the rows as the
ORM does (`Model.from_db`, with each field's `from_db_value`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import Field, Model

M = TypeVar("M", bound=Model)


def _column(field: Field) -> str:
    if field.column is None:  # a concrete field always has one
        raise TypeError(f"{field} has no column")
    return field.column


class ModelRows(Generic[M]):
    """Reads of `model` by fixed SQL: `select(where)` is the statement, `fetch` runs it."""

    def __init__(self, model: type[M], *, using: str = DEFAULT_DB_ALIAS) -> None:
        fields = model._meta.concrete_fields
        quote = connections[using].ops.quote_name
        self.model = model
        self.using = using
        self.table = quote(model._meta.db_table)
        self.columns = ", ".join(quote(_column(field)) for field in fields)
        self.fields = list(fields)
        self.attnames = [field.attname for field in fields]
        self.row_placeholder = "(" + ", ".join(["%s"] * len(fields)) + ")"
        # JSONField (and any field with from_db_value) turns the column's value into
        # the attribute's, as the ORM's converters do.
        self.converters: list[tuple[int, Callable[..., Any], Any]] = [
            (index, field.from_db_value, field.cached_col)
            for index, field in enumerate(fields)
            if hasattr(field, "from_db_value")
        ]

    def columns_of(self, alias: str) -> str:
        """The model's columns qualified by a table alias (for a join)."""
        return ", ".join(f"{alias}.{column}" for column in self.columns.split(", "))

    @property
    def width(self) -> int:
        return len(self.attnames)

    def select(self, where: str, *, order_by: str = "") -> str:
        """`SELECT <the model's columns> FROM <its table> WHERE <where> [ORDER BY ...]`."""
        sql = f"SELECT {self.columns} FROM {self.table} WHERE {where}"  # noqa: S608 (constants)
        return f"{sql} ORDER BY {order_by}" if order_by else sql

    def insert_values(self, instances: Sequence[M]) -> tuple[str, list[Any]]:
        """The VALUES list and parameters of an INSERT of `instances` into this model's
        columns (`columns`, primary key included: set it first), holding what the ORM
        would write (each field's pre_save, then get_db_prep_save), for a statement
        that carries other writes too. The instances count as saved afterwards."""
        connection = connections[self.using]
        params: list[Any] = []
        for instance in instances:
            params += [
                field.get_db_prep_save(field.pre_save(instance, True), connection)
                for field in self.fields
            ]
            instance._state.adding = False
            instance._state.db = self.using
        return ", ".join([self.row_placeholder] * len(instances)), params

    def fetch(self, sql: str, params: Sequence[Any]) -> list[M]:
        """Run one of this reader's statements; the instances of its rows."""
        connection = connections[self.using]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return self.load(cursor.fetchall())

    def load(self, rows: Iterable[Sequence[Any]], *, start: int = 0) -> list[M]:
        """Instances of the rows; with `start`, of each row's `width` columns from there
        (a join's rows carry several models' columns side by side)."""
        connection = connections[self.using]
        instances = []
        for row in rows:
            if start or len(row) != self.width:
                row = row[start : start + self.width]
            if self.converters:
                values = list(row)
                for index, convert, column in self.converters:
                    values[index] = convert(values[index], column, connection)
                row = values
            instances.append(self.model.from_db(self.using, self.attnames, row))
        return instances
