"""The Jobs endpoints of API.md: thin views over jobs.services and jobs.selectors."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics
from rest_framework import status as http
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.views import APIView

from jobs import selectors, services, waiting
from jobs.api import serializers
from jobs.models import Job
from jobs.pipelines import registry as pipelines
from omniva import selectors as core_selectors
from omniva.api import serializers as core_serializers
from omniva.api import views as core_views
from omniva.api.middleware import note_entities
from omniva.api.parking import park
from omniva.api.permissions import bound_project
from omniva.api.renderers import EnvelopeResponse
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Project, Scope

IDEMPOTENCY_HEADER = "Idempotency-Key"


class JobsView:
    read_scope = Scope.JOBS_READ
    write_scope = Scope.JOBS_WRITE
    not_found_code = ErrorCode.JOB_NOT_FOUND


def submit_project(request: Request, project_id: Any) -> Project | None:
    """The project a submission belongs to: a bound key's own, or the one named."""
    bound = bound_project(request)
    if bound is not None:
        if project_id is not None and project_id != bound.pk:
            raise PermissionDenied("This key may only submit jobs to its own project.")
        return bound
    if project_id is None:
        return None
    project = Project.objects.filter(pk=project_id).first()
    if project is None:
        raise ValidationError({"project": [f"No project {project_id}."]})
    return project


def idempotency_key(request: Request, body_key: str | None) -> str | None:
    header = request.headers.get(IDEMPOTENCY_HEADER)
    if header is not None:
        header = header.strip()
        if not header or len(header) > 200:
            raise ValidationError({IDEMPOTENCY_HEADER: ["1 to 200 characters."]})
        if body_key and body_key != header:
            raise ValidationError({"idempotency_key": ["differs from the Idempotency-Key header."]})
        return header
    return body_key


def render_job(
    job: Job, *, status: int = http.HTTP_200_OK, reload: bool = True
) -> EnvelopeResponse:
    """The job as it stands (read again unless `reload=False`: it was just read with
    its stages)."""
    if reload:
        found = selectors.job_for_caller(job_id=job.pk, project=None, with_stages=True)
        if found is None:
            raise NotFound(f"No job {job.pk}.")
        job = found
    data = serializers.JobSerializer(job, context={"with_estimate": True}).data
    return EnvelopeResponse(data, status=status)


def job_or_404(request: Request, job_id: str, *, with_stages: bool = False) -> Job:
    job = selectors.job_for_caller(
        job_id=job_id, project=bound_project(request), with_stages=with_stages
    )
    if job is None:
        raise NotFound(f"No job {job_id}.")
    note_entities(request, job.pk)
    return job


class JobListView(JobsView, generics.ListAPIView):
    serializer_class = serializers.JobSerializer

    def get_queryset(self) -> Any:
        filters = serializers.JobFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        wanted = dict(filters.validated_data)
        return selectors.job_list(
            project=bound_project(self.request), filters=wanted
        ).prefetch_related(selectors.STAGES_IN_ORDER)

    def paginate_queryset(self, queryset: Any) -> list[Any] | None:
        page = super().paginate_queryset(queryset)
        return None if page is None else services.jobs_settle_due(jobs=page)

    @extend_schema(parameters=[serializers.JobFilterSerializer], summary="Jobs, newest first")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=serializers.JobSubmitSerializer,
        responses={200: serializers.JobSerializer, 202: serializers.JobSerializer},
        parameters=[OpenApiParameter(IDEMPOTENCY_HEADER, str, OpenApiParameter.HEADER)],
        summary="Submit a job (202); a known idempotency key returns its job (200)",
    )
    def post(self, request: Request) -> EnvelopeResponse:
        body = serializers.JobSubmitSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        wanted = dict(body.validated_data)
        sync, sync_timeout_s = wanted.pop("sync"), wanted.pop("sync_timeout_s")
        wanted["project"] = submit_project(request, wanted.pop("project", None))
        wanted["idempotency_key"] = idempotency_key(request, wanted.get("idempotency_key"))
        job, created = services.job_submit(
            **wanted, bound_project=bound_project(request), awaited=sync
        )
        note_entities(request, job.pk)
        pending_status = http.HTTP_202_ACCEPTED if created else http.HTTP_200_OK
        response = render_job(
            job,
            status=http.HTTP_200_OK if job.is_finished else pending_status,
            reload=not created,  # a job just created renders as job_submit made it
        )
        if not sync or job.is_finished:
            return response

        def answer(last: bool) -> tuple[int, Any] | None:
            # 200 with the finished job; when the wait ran out, the job as it stands.
            found = selectors.job_for_caller(job_id=job.pk, project=None, with_stages=True)
            if found is None:
                raise NotFound(f"Job {job.pk} was deleted while the request waited.")
            if not found.is_finished and not last:
                return None
            data = serializers.JobSerializer(found, context={"with_estimate": True}).data
            return (http.HTTP_200_OK if found.is_finished else pending_status), data

        return park(
            request,
            response,
            listener=waiting.listener,
            payload=str(job.pk),
            timeout_s=sync_timeout_s,
            attempt=answer,
        )


class JobBatchView(JobsView, APIView):
    @extend_schema(
        request=serializers.JobBatchSerializer,
        responses={202: serializers.JobSerializer, 200: serializers.JobSerializer},
        summary="Submit a batch: a parent job whose children run independently",
    )
    def post(self, request: Request) -> EnvelopeResponse:
        body = serializers.JobBatchSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        wanted = dict(body.validated_data)
        parent, created = services.job_submit_batch(
            items=[dict(item) for item in wanted["items"]],
            priority=wanted.get("priority"),
            max_retries=wanted.get("max_retries"),
            project=submit_project(request, wanted.get("project")),
            idempotency_key=idempotency_key(request, wanted.get("idempotency_key")),
            bound_project=bound_project(request),
        )
        note_entities(request, parent.pk)
        return render_job(parent, status=http.HTTP_202_ACCEPTED if created else http.HTTP_200_OK)


class JobDetailView(JobsView, APIView):
    @extend_schema(responses=serializers.JobSerializer, summary="One job with its stages")
    def get(self, request: Request, job_id: str) -> EnvelopeResponse:
        # A queue with no worker, or an engine type with no engine, still reports the
        # timeout: every read settles a job past its deadline (jobs_settle_due).
        [job] = services.jobs_settle_due(jobs=[job_or_404(request, job_id, with_stages=True)])
        return render_job(job, reload=False)

    @extend_schema(responses={200: None}, summary="Delete a finished job, its stages, logs, files")
    def delete(self, request: Request, job_id: str) -> EnvelopeResponse:
        job = job_or_404(request, job_id)
        services.job_delete(job_id=job.pk)
        return EnvelopeResponse(None)


class JobLogsView(JobsView, generics.ListAPIView):
    serializer_class = serializers.JobLogSerializer

    def get_queryset(self) -> Any:
        job = job_or_404(self.request, self.kwargs["job_id"])
        return job.logs.order_by("id")

    @extend_schema(summary="The job's log lines, oldest first")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)


class JobCancelView(JobsView, APIView):
    @extend_schema(
        request=serializers.JobCancelSerializer,
        responses={200: serializers.JobSerializer, 202: serializers.JobSerializer},
        summary="Cancel: pending at once (200), running at its next checkpoint (202)",
    )
    def post(self, request: Request, job_id: str) -> EnvelopeResponse:
        job = job_or_404(request, job_id)
        body = serializers.JobCancelSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        job, finished = services.job_cancel(job_id=job.pk, reason=body.validated_data["reason"])
        return render_job(job, status=http.HTTP_200_OK if finished else http.HTTP_202_ACCEPTED)


class JobRetryView(JobsView, APIView):
    @extend_schema(
        request=None,
        responses=serializers.JobSerializer,
        summary="Run a failed, cancelled or timed-out job again (only what did not complete)",
    )
    def post(self, request: Request, job_id: str) -> EnvelopeResponse:
        job = job_or_404(request, job_id)
        return render_job(services.job_retry(job_id=job.pk))


class JobCleanupView(JobsView, APIView):
    @extend_schema(
        request=serializers.JobCleanupSerializer,
        responses=serializers.CleanupResultSerializer,
        summary="Delete finished jobs older than max_age_s",
    )
    def post(self, request: Request) -> EnvelopeResponse:
        if bound_project(request) is not None:
            raise PermissionDenied("A key bound to a project cannot clean up every job.")
        body = serializers.JobCleanupSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        cleared = services.jobs_cleanup(**body.validated_data)
        return EnvelopeResponse({"cleared": cleared})


class PipelineListView(APIView):
    read_scope = Scope.JOBS_READ

    @extend_schema(
        responses=serializers.PipelineSerializer(many=True),
        summary="Pipelines: params schema and stages with their dependencies and queue",
    )
    def get(self, request: Request) -> EnvelopeResponse:
        return EnvelopeResponse([p.describe() for p in pipelines.all_pipelines()])


class ClipSearchView(APIView):
    """Semantic search over the caller's clips: the query is embedded on the gpu queue."""

    read_scope = Scope.CONTENT

    @extend_schema(
        parameters=[core_serializers.ClipSearchParamsSerializer],
        responses={
            200: core_serializers.ClipMatchSerializer(many=True),
            404: OpenApiResponse(description="No such project (PROJECT_NOT_FOUND)."),
            503: OpenApiResponse(description="No gpu worker embedded the query in time."),
        },
        summary="Clips closest in meaning to `q`, with their cosine similarity",
    )
    def get(self, request: Request) -> EnvelopeResponse:
        params = core_serializers.ClipSearchParamsSerializer(data=request.query_params)
        params.is_valid(raise_exception=True)
        wanted = params.validated_data
        project = bound_project(request)
        if project is None and "project" in wanted:
            project = Project.objects.filter(pk=wanted["project"]).first()
            if project is None:
                raise OmnivaError(ErrorCode.PROJECT_NOT_FOUND, "No such project.")
        vector = services.query_embedding_make(text=wanted["q"], project=project)
        matches = core_selectors.clips_nearest(
            project=project, vector=vector, limit=wanted["limit"]
        )
        return EnvelopeResponse(core_views.match_data(matches))
