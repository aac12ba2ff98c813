"""The filters of the /v1 lists, as django-filter FilterSets (one per list).

A list's query parameters are validated by its DRF filter serializer first: that
serializer is the API's contract (its 400 VALIDATION_ERROR messages, and the OpenAPI
parameters drf-spectacular reads from it), and a FilterSet's Django form would word its
errors differently. The FilterSet then applies what the serializer let through: a
parameter that is absent or empty filters nothing, one that is given narrows the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import django_filters
from django.db.models import QuerySet

from omniva.errors import ErrorCode, OmnivaError
from omniva.models import ClipStatus


class ValidatedFilterSet(django_filters.FilterSet):
    @classmethod
    def apply(cls, queryset: QuerySet, values: Mapping[str, Any]) -> QuerySet:
        """`queryset` narrowed by `values`, the validated data of the list's serializer."""
        if not values:
            return queryset
        # A serializer's MultipleChoiceField gives a set; a form's wants a list.
        data = {
            name: sorted(value) if isinstance(value, set | frozenset) else value
            for name, value in values.items()
        }
        filterset = cls(data, queryset=queryset)
        if not filterset.is_valid():
            # The serializer accepted what the FilterSet refuses: the two disagree. Refused
            # as the serializer would (400, naming the parameters), since a dropped filter
            # would widen the list silently and a 500 would blame the server for a query.
            raise OmnivaError(
                ErrorCode.VALIDATION_ERROR,
                "The list's filters are not valid.",
                details={name: list(errors) for name, errors in filterset.errors.items()},
            )
        return filterset.qs


class ProjectContentFilter(ValidatedFilterSet):
    """Any project's content (creators, destinations, schedules): `?project=`."""

    project = django_filters.UUIDFilter()


class ClipFilter(ProjectContentFilter):
    creator = django_filters.UUIDFilter()
    status = django_filters.ChoiceFilter(choices=ClipStatus.choices)


class AuditFilter(ValidatedFilterSet):
    request_id = django_filters.CharFilter()
    path = django_filters.CharFilter()
    status = django_filters.NumberFilter()
    key = django_filters.CharFilter(field_name="key_name")
