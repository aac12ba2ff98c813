"""The service endpoints (health, info, metrics), projects, audit, and /v1's fallbacks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.defaults import bad_request as django_bad_request
from django.views.defaults import page_not_found as django_page_not_found
from django.views.defaults import permission_denied as django_permission_denied
from django.views.defaults import server_error as django_server_error
from drf_spectacular.utils import extend_schema
from rest_framework import generics
from rest_framework import status as http
from rest_framework.exceptions import NotFound, PermissionDenied
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from omniva import selectors, services
from omniva.api import serializers
from omniva.api.envelope import error_body, error_response
from omniva.api.filters import AuditFilter, ClipFilter, ProjectContentFilter, ValidatedFilterSet
from omniva.api.middleware import is_api_path
from omniva.api.permissions import bound_project
from omniva.api.renderers import EnvelopeResponse
from omniva.errors import ErrorCode, OmnivaError
from omniva.health import health_report
from omniva.models import AuditRecord, Clip, Creator, Project, Scope


class PublicView(APIView):
    """No key, no throttle: load balancers and monitors poll these."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes: list = []


class HealthView(PublicView):
    @extend_schema(
        responses={200: serializers.HealthSerializer, 503: serializers.HealthSerializer},
        summary="Service health; 503 when unhealthy",
        auth=[],
    )
    def get(self, request: Request) -> EnvelopeResponse:
        report = health_report()
        if report["status"] == "unhealthy":
            return EnvelopeResponse(
                report,
                status=http.HTTP_503_SERVICE_UNAVAILABLE,
                error=error_body(ErrorCode.SERVICE_UNAVAILABLE, "The service is unhealthy."),
            )
        return EnvelopeResponse(report)


@extend_schema(exclude=True)
class RootHealthView(HealthView):
    """/health, for load balancers that probe outside the API's prefix."""


class InfoView(PublicView):
    @extend_schema(
        responses=serializers.InfoSerializer, summary="Name, version and configuration", auth=[]
    )
    def get(self, request: Request) -> EnvelopeResponse:
        return EnvelopeResponse(selectors.service_info())


class MetricsView(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(responses=serializers.MetricsSerializer, summary="Queue, worker and API metrics")
    def get(self, request: Request) -> EnvelopeResponse:
        return EnvelopeResponse(selectors.service_metrics())


class ProjectScopedQueryset(generics.GenericAPIView):
    def get_queryset(self) -> Any:
        projects = Project.objects.all()
        project = bound_project(self.request)
        return projects.filter(pk=project.pk) if project else projects


class ProjectListView(ProjectScopedQueryset, generics.ListCreateAPIView):
    serializer_class = serializers.ProjectSerializer
    read_scope = Scope.CONTENT
    write_scope = Scope.CONTENT

    def create(self, request: Request, *args: Any, **kwargs: Any) -> EnvelopeResponse:
        if bound_project(request) is not None:
            raise PermissionDenied("A key bound to a project cannot create projects.")
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        project = services.project_create(**serializer.validated_data)
        return EnvelopeResponse(self.get_serializer(project).data, status=http.HTTP_201_CREATED)


class ProjectDetailView(ProjectScopedQueryset, generics.RetrieveUpdateDestroyAPIView):
    serializer_class = serializers.ProjectSerializer
    read_scope = Scope.CONTENT
    write_scope = Scope.CONTENT
    not_found_code = ErrorCode.PROJECT_NOT_FOUND
    http_method_names = ["get", "patch", "delete", "head", "options"]

    def update(self, request: Request, *args: Any, **kwargs: Any) -> EnvelopeResponse:
        instance = self.get_object()
        serializer = self.get_serializer(instance, data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        project = services.project_update(project=instance, changes=serializer.validated_data)
        return EnvelopeResponse(self.get_serializer(project).data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> EnvelopeResponse:
        project = self.get_object()
        if bound_project(request) is not None:
            raise PermissionDenied("A key bound to a project cannot delete it.")
        services.project_delete(project=project)
        return EnvelopeResponse(None)


def _write_project(request: Request, given: Project | None) -> Project:
    """The project a new creator or clip goes to: the key's own, or the one named."""
    bound = bound_project(request)
    if bound is not None:
        return bound
    if given is None:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            "Name the project.",
            details={"project": ["This field is required."]},
        )
    return given


class ContentQueryset(generics.GenericAPIView):
    """Creators and clips the caller may see, narrowed by `?project=` (and the view's
    own filters)."""

    model: Any
    filterset_class: type[ValidatedFilterSet] = ProjectContentFilter

    def get_queryset(self) -> Any:
        items = self.model.objects.all()
        bound = bound_project(self.request)
        if bound is not None:
            items = items.filter(project=bound)
        wanted = serializers.ContentFilterSerializer(data=self.request.query_params)
        wanted.is_valid(raise_exception=True)
        return self.filterset_class.apply(items, wanted.validated_data)

    def get_serializer_context(self) -> dict[str, Any]:
        context = dict(super().get_serializer_context())
        context["bound_project"] = bound_project(self.request)
        return context


class ContentListView(ContentQueryset, generics.ListCreateAPIView):
    read_scope = Scope.CONTENT
    write_scope = Scope.CONTENT
    # The service that creates one item: create_item(project=..., **fields).
    create_item: Callable[..., Any]

    def create(self, request: Request, *args: Any, **kwargs: Any) -> EnvelopeResponse:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        project = _write_project(request, fields.pop("project", None))
        item = type(self).create_item(project=project, **fields)
        return EnvelopeResponse(self.get_serializer(item).data, status=http.HTTP_201_CREATED)


class ContentDetailView(ContentQueryset, generics.RetrieveUpdateDestroyAPIView):
    read_scope = Scope.CONTENT
    write_scope = Scope.CONTENT
    http_method_names = ["get", "patch", "delete", "head", "options"]
    # The services that change and delete one item.
    update_item: Callable[[Any, dict[str, Any]], Any]
    delete_item: Callable[[Any], None]

    def update(self, request: Request, *args: Any, **kwargs: Any) -> EnvelopeResponse:
        serializer = self.get_serializer(self.get_object(), data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        changes = dict(serializer.validated_data)
        changes.pop("project", None)  # an item stays in its project
        item = type(self).update_item(serializer.instance, changes)
        return EnvelopeResponse(self.get_serializer(item).data)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> EnvelopeResponse:
        type(self).delete_item(self.get_object())
        return EnvelopeResponse(None)


class CreatorListView(ContentListView):
    model = Creator
    serializer_class = serializers.CreatorSerializer
    create_item = staticmethod(services.creator_create)


class CreatorDetailView(ContentDetailView):
    model = Creator
    serializer_class = serializers.CreatorSerializer
    not_found_code = ErrorCode.CREATOR_NOT_FOUND
    update_item = staticmethod(
        lambda item, changes: services.creator_update(creator=item, changes=changes)
    )
    delete_item = staticmethod(lambda item: services.creator_delete(creator=item))


class ClipListView(ContentListView):
    model = Clip
    filterset_class = ClipFilter
    serializer_class = serializers.ClipSerializer
    create_item = staticmethod(services.clip_create)


class ClipDetailView(ContentDetailView):
    model = Clip
    serializer_class = serializers.ClipSerializer
    not_found_code = ErrorCode.CLIP_NOT_FOUND
    update_item = staticmethod(
        lambda item, changes: services.clip_update(clip=item, changes=changes)
    )
    delete_item = staticmethod(lambda item: services.clip_delete(clip=item))


class ClipSimilarView(ContentQueryset, generics.GenericAPIView):
    model = Clip
    read_scope = Scope.CONTENT
    not_found_code = ErrorCode.CLIP_NOT_FOUND

    @extend_schema(
        parameters=[serializers.ClipSimilarParamsSerializer],
        responses={200: serializers.ClipMatchSerializer(many=True)},
        summary="The clips of the same project closest in meaning to this one",
    )
    def get(self, request: Request, pk: Any) -> EnvelopeResponse:
        clip = self.get_object()
        params = serializers.ClipSimilarParamsSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        if clip.embedding is None:
            raise OmnivaError(
                ErrorCode.EMBEDDING_PENDING, "The clip's embedding is not made yet; try again."
            )
        matches = selectors.clips_nearest(
            project=clip.project,
            vector=list(clip.embedding),
            limit=params.validated_data["limit"],
            exclude=clip.pk,
        )
        return EnvelopeResponse(match_data(matches))


def match_data(matches: list[tuple[Clip, float]]) -> list[dict[str, Any]]:
    return [
        {"score": round(score, 6), "clip": serializers.ClipSerializer(clip).data}
        for clip, score in matches
    ]


class AuditListView(generics.ListAPIView):
    serializer_class = serializers.AuditRecordSerializer
    read_scope = Scope.ADMIN
    unbound_only = True  # records of every project's requests

    def get_queryset(self) -> Any:
        filters = serializers.AuditFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        records = AuditRecord.objects.select_related("user")
        return AuditFilter.apply(records, filters.validated_data)

    @extend_schema(parameters=[serializers.AuditFilterSerializer])
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)


@extend_schema(exclude=True)
class NotFoundView(APIView):
    """Every unknown path under /v1: an enveloped 404, whatever the method."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes: list = []

    def _not_found(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        raise NotFound(f"No endpoint at {request.path}.")

    get = post = put = patch = delete = head = options = _not_found


# Django's own error handlers, for errors raised outside DRF views (a bad Host header
# in middleware, say): the envelope under /v1, Django's pages elsewhere.


def bad_request(request: HttpRequest, exception: Exception) -> HttpResponse:
    if is_api_path(request.path):
        return error_response(request, ErrorCode.MALFORMED_REQUEST, "Bad request.")
    return django_bad_request(request, exception)


def permission_denied(request: HttpRequest, exception: Exception) -> HttpResponse:
    if is_api_path(request.path):
        return error_response(request, ErrorCode.PERMISSION_DENIED, "Permission denied.")
    return django_permission_denied(request, exception)


def page_not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    if is_api_path(request.path):
        return error_response(request, ErrorCode.NOT_FOUND, "Not found.")
    return django_page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if is_api_path(request.path):
        return error_response(request, ErrorCode.INTERNAL_ERROR, "Internal server error.")
    return django_server_error(request)
