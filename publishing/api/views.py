"""/v1/destinations (create, list, get, update, delete) and /v1/publications (read)."""

from __future__ import annotations

from typing import Any

from rest_framework import generics

from omniva.api.permissions import bound_project
from omniva.api.views import ContentDetailView, ContentListView
from omniva.errors import ErrorCode
from omniva.models import Scope
from publishing import services
from publishing.api import serializers
from publishing.models import Destination, Publication


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
        return publications.filter(**wanted.validated_data)


class PublicationListView(PublicationQueryset, generics.ListAPIView):
    serializer_class = serializers.PublicationSerializer
    read_scope = Scope.CONTENT


class PublicationDetailView(PublicationQueryset, generics.RetrieveAPIView):
    serializer_class = serializers.PublicationSerializer
    read_scope = Scope.CONTENT
    not_found_code = ErrorCode.PUBLICATION_NOT_FOUND
