"""/v1/destinations and /v1/schedules (create, list, get, update, delete) and
/v1/publications (read)."""

from __future__ import annotations

from typing import Any

from rest_framework import generics

from omniva.api.permissions import bound_project
from omniva.api.views import ContentDetailView, ContentListView
from omniva.errors import ErrorCode
from omniva.models import Scope
from publishing import services
from publishing.api import serializers
from publishing.api.filters import PublicationFilter
from publishing.models import Destination, Publication, Schedule


class DestinationListView(ContentListView):
    model = Destination
    serializer_class = serializers.DestinationSerializer
    create_item = staticmethod(services.destination_create)


class DestinationDetailView(ContentDetailView):
    model = Destination
    serializer_class = serializers.DestinationSerializer
    not_found_code = ErrorCode.DESTINATION_NOT_FOUND
    update_item = staticmethod(
        lambda item, changes: services.destination_update(destination=item, changes=changes)
    )
    delete_item = staticmethod(lambda item: services.destination_delete(destination=item))


class PublicationQueryset:
    request: Any

    def get_queryset(self) -> Any:
        publications = Publication.objects.all()
        bound = bound_project(self.request)
        if bound is not None:
            publications = publications.filter(destination__project=bound)
        wanted = serializers.PublicationFilterSerializer(data=self.request.query_params)
        wanted.is_valid(raise_exception=True)
        return PublicationFilter.apply(publications, wanted.validated_data)


class PublicationListView(PublicationQueryset, generics.ListAPIView):
    serializer_class = serializers.PublicationSerializer
    read_scope = Scope.CONTENT


class PublicationDetailView(PublicationQueryset, generics.RetrieveAPIView):
    serializer_class = serializers.PublicationSerializer
    read_scope = Scope.CONTENT
    not_found_code = ErrorCode.PUBLICATION_NOT_FOUND


class ScheduleListView(ContentListView):
    model = Schedule
    serializer_class = serializers.ScheduleSerializer
    create_item = staticmethod(services.schedule_create)

    def get_queryset(self) -> Any:
        return super().get_queryset().select_related("q_schedule")


class ScheduleDetailView(ContentDetailView):
    model = Schedule
    serializer_class = serializers.ScheduleSerializer
    not_found_code = ErrorCode.SCHEDULE_NOT_FOUND
    update_item = staticmethod(
        lambda item, changes: services.schedule_update(schedule=item, changes=changes)
    )
    delete_item = staticmethod(lambda item: services.schedule_delete(schedule=item))
