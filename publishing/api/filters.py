"""The publications list's filters (omniva/api/filters.py says how the lists filter)."""

from __future__ import annotations

import django_filters

from omniva.api.filters import ValidatedFilterSet
from publishing.models import PublicationStatus


class PublicationFilter(ValidatedFilterSet):
    """GET /v1/publications's filters (publishing.api.serializers.PublicationFilterSerializer)."""

    destination = django_filters.UUIDFilter()
    clip = django_filters.UUIDFilter()
    status = django_filters.ChoiceFilter(choices=PublicationStatus.choices)
