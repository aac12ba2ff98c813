"""The Engines endpoints of API.md (seed 000): thin views over engines.services."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics
from rest_framework import status as http
from rest_framework.request import Request
from rest_framework.views import APIView

from engines import selectors, services
from engines.api import serializers
from engines.models import EngineInstance, Event, EventStatus, EventType
from omniva.api.middleware import note_entities
from omniva.api.parking import park
from omniva.api.renderers import EnvelopeResponse
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import ApiKey, Scope
from omniva.row_ids import row_id


class EnginesView:
    read_scope = Scope.ENGINES
    write_scope = Scope.ENGINES
    # Engines serve every project and their events carry any project's data.
    unbound_only = True


def render_engine(engine: EngineInstance, *, status: int = http.HTTP_200_OK) -> EnvelopeResponse:
    return EnvelopeResponse(serializers.EngineSerializer(engine).data, status=status)


def render_event(event: Event, *, status: int = http.HTTP_200_OK) -> EnvelopeResponse:
    return EnvelopeResponse(serializers.EventSerializer(event).data, status=status)


def claimant(request: Request) -> str:
    """Who makes the request, as a claim records it (Event.claimed_by): a token-less
    report is fenced by it (engines.services._fence)."""
    if isinstance(request.auth, ApiKey):
        return f"key:{request.auth.pk}"
    user = request.user
    if user is not None and user.is_authenticated and user.pk is not None:
        return f"user:{user.pk}"
    return ""


def event_or_404(request: Request, event_id: str) -> Event:
    pk = row_id(event_id)
    event = None if pk is None else Event.objects.select_related("event_type").filter(pk=pk).first()
    if event is None:
        raise OmnivaError(ErrorCode.EVENT_NOT_FOUND, f"No event {event_id}.")
    note_entities(request, event.pk)
    return event


class EngineListView(EnginesView, generics.ListAPIView):
    serializer_class = serializers.EngineSerializer

    def get_queryset(self) -> Any:
        filters = serializers.EngineFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.engine_list(filters=dict(filters.validated_data))

    @extend_schema(parameters=[serializers.EngineFilterSerializer], summary="Engines")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=serializers.EngineRegisterSerializer,
        responses={201: serializers.EngineSerializer},
        summary="Register an engine (409 when an online engine holds the name)",
    )
    def post(self, request: Request) -> EnvelopeResponse:
        body = serializers.EngineRegisterSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        engine = services.engine_register(**body.validated_data)
        note_entities(request, engine.pk)
        return render_engine(engine, status=http.HTTP_201_CREATED)


class EngineDetailView(EnginesView, APIView):
    @extend_schema(responses=serializers.EngineSerializer, summary="One engine")
    def get(self, request: Request, engine_id: str) -> EnvelopeResponse:
        engine = services._engine(engine_id)
        note_entities(request, engine.pk)
        return render_engine(engine)

    @extend_schema(
        responses={200: None}, summary="Deregister: the events it holds go back to the queue"
    )
    def delete(self, request: Request, engine_id: str) -> EnvelopeResponse:
        released = services.engine_deregister(engine_id=engine_id)
        note_entities(request, engine_id)
        return EnvelopeResponse({"id": engine_id, "released_events": released})


class EngineHeartbeatView(EnginesView, APIView):
    @extend_schema(
        request=serializers.EngineHeartbeatSerializer,
        responses=serializers.EngineSerializer,
        summary="Heartbeat: status, workload, utilization; extends the engine's leases",
    )
    def put(self, request: Request, engine_id: str) -> EnvelopeResponse:
        body = serializers.EngineHeartbeatSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        engine = services.engine_heartbeat(engine_id=engine_id, **body.validated_data)
        note_entities(request, engine.pk)
        return render_engine(engine)


class EventTypeListView(EnginesView, generics.ListCreateAPIView):
    serializer_class = serializers.EventTypeSerializer

    def get_queryset(self) -> Any:
        return EventType.objects.order_by("name")

    @extend_schema(summary="Event types")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=serializers.EventTypeSerializer,
        responses={201: serializers.EventTypeSerializer},
        summary="Create an event type",
    )
    def post(self, request: Request, *args: Any, **kwargs: Any) -> EnvelopeResponse:
        body = serializers.EventTypeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        event_type = services.event_type_create(**body.validated_data)
        return EnvelopeResponse(
            serializers.EventTypeSerializer(event_type).data, status=http.HTTP_201_CREATED
        )


class EventListView(EnginesView, generics.ListAPIView):
    serializer_class = serializers.EventSerializer

    def get_queryset(self) -> Any:
        filters = serializers.EventFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.event_list(filters=dict(filters.validated_data))

    @extend_schema(parameters=[serializers.EventFilterSerializer], summary="Events, newest first")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=serializers.EventCreateSerializer,
        responses={201: serializers.EventSerializer},
        summary="Queue an event",
    )
    def post(self, request: Request) -> EnvelopeResponse:
        body = serializers.EventCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        event = services.event_create(**body.validated_data)
        note_entities(request, event.pk)
        return render_event(event, status=http.HTTP_201_CREATED)


class DeadLetterListView(EnginesView, generics.ListAPIView):
    serializer_class = serializers.EventSerializer

    def get_queryset(self) -> Any:
        return selectors.event_list(filters={"status": EventStatus.DEAD_LETTERED})

    @extend_schema(summary="The dead letter queue, newest first")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)


def render_claim(events: list[Event]) -> EnvelopeResponse:
    return EnvelopeResponse(serializers.ClaimedEventSerializer(events, many=True).data)


def claim_or_park(request: Request, *, wait_s: float = 0, **claim: Any) -> EnvelopeResponse:
    """A claim; with `wait_s` and nothing to claim yet, the request is parked until an
    event of its type is queued (woken by NOTIFY), holding no thread or connection."""
    events = services.events_claim(**claim)
    response = render_claim(events)
    if events or wait_s <= 0:
        return response

    def answer(last: bool) -> tuple[int, Any] | None:
        claimed = services.events_claim(**claim)
        if not claimed and not last:
            return None
        return http.HTTP_200_OK, serializers.ClaimedEventSerializer(claimed, many=True).data

    return park(
        request,
        response,
        listener=services.listener,
        payload=claim["engine_type"],
        timeout_s=wait_s,
        attempt=answer,
    )


class EventClaimView(EnginesView, APIView):
    @extend_schema(
        request=serializers.ClaimSerializer,
        responses={
            200: serializers.ClaimedEventSerializer(many=True),
            404: OpenApiResponse(description="No such engine (ENGINE_NOT_FOUND)."),
        },
        summary="Claim a batch of events (highest priority, then oldest); long-polls wait_s",
    )
    def post(self, request: Request) -> EnvelopeResponse:
        body = serializers.ClaimSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        return claim_or_park(request, claimant=claimant(request), **body.validated_data)


class EventQueueView(EnginesView, APIView):
    # Seed 000's form of the claim: a GET that leases (engines scope either way).
    @extend_schema(
        parameters=[serializers.QueueClaimSerializer],
        responses=serializers.ClaimedEventSerializer(many=True),
        summary="Seed 000's claim: the next batch of events of an engine type",
    )
    def get(self, request: Request, engine_type: str) -> EnvelopeResponse:
        query = serializers.QueueClaimSerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        body = serializers.ClaimSerializer(data={"engine_type": engine_type})
        body.is_valid(raise_exception=True)
        return claim_or_park(
            request, engine_type=engine_type, claimant=claimant(request), **query.validated_data
        )


class EventDetailView(EnginesView, APIView):
    @extend_schema(responses=serializers.EventSerializer, summary="One event")
    def get(self, request: Request, event_id: str) -> EnvelopeResponse:
        return render_event(event_or_404(request, event_id))


class EventStatusView(EnginesView, APIView):
    @extend_schema(
        request=serializers.EventStatusSerializer,
        responses=serializers.EventSerializer,
        summary="Report on a leased event: processing, completed or failed (409 if stale)",
        description=(
            "Seed 000's report. Fenced by the `lease_token` the claim returned; without it "
            "(seed 000's clients send none) by `engine_id`, which must be the engine holding "
            "the lease; without either, the lease must have been claimed without an engine "
            "id and with the same API key. Anything else, or an event past its deadline "
            "(its job timed out), answers 409 EVENT_LEASE_LOST and applies nothing."
        ),
    )
    def put(self, request: Request, event_id: str) -> EnvelopeResponse:
        event = event_or_404(request, event_id)
        body = serializers.EventStatusSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        event = services.event_update_status(
            event_id=event.pk, claimant=claimant(request), **body.validated_data
        )
        return render_event(event)


def render_report_answer(event_id: int, answer: Event | OmnivaError) -> dict[str, Any]:
    if isinstance(answer, Event):
        return {"id": event_id, "ok": True, "event": serializers.EventSerializer(answer).data}
    error: dict[str, Any] = {"code": str(answer.code), "message": answer.message}
    if answer.details is not None:
        error["details"] = answer.details
    return {"id": event_id, "ok": False, "error": error}


class EventReportBatchView(EnginesView, APIView):
    @extend_schema(
        request=serializers.EventReportSerializer(many=True),
        responses=serializers.EventReportAnswerSerializer(many=True),
        operation_id="events_status_batch_update",
        summary="Report on several leased events in one request; answered item by item, "
        "each fenced like the single report",
        description=(
            "A JSON list of 1 to 100 reports, each the single report's fields plus the "
            "event's `id` and its `lease_token` (required). Any malformed item refuses the "
            "whole request (400 VALIDATION_ERROR, `details` keyed by the item's position) and "
            "nothing is applied. Otherwise the answer is 200 with one entry per report, in "
            "order, each applied in its own transaction: `{id, ok: true, event}` or "
            "`{id, ok: false, error: {code, message}}` with the single report's codes "
            "(EVENT_LEASE_LOST, EVENT_NOT_FOUND, ...); a refused report changes nothing."
        ),
    )
    def put(self, request: Request) -> EnvelopeResponse:
        body = serializers.EventReportSerializer(data=request.data, many=True)
        body.is_valid(raise_exception=True)
        reports = body.validated_data
        answers = services.events_report(reports=reports, claimant=claimant(request))
        return EnvelopeResponse(
            [render_report_answer(r["id"], a) for r, a in zip(reports, answers, strict=True)]
        )


class EventRequeueView(EnginesView, APIView):
    @extend_schema(
        request=None,
        responses=serializers.EventSerializer,
        summary="Requeue a dead-lettered event with its retries renewed",
    )
    def post(self, request: Request, event_id: str) -> EnvelopeResponse:
        event = event_or_404(request, event_id)
        return render_event(services.event_requeue(event_id=event.pk))
