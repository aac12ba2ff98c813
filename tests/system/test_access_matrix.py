"""Who may call what: every /v1 endpoint, the websockets and the gRPC methods against
every kind of credential (issue 10, "Access").

The REST endpoints are read from the URL resolver, so a new endpoint is covered (or
fails loudly for a path parameter this file cannot fill) without editing the list. The
scope each method needs comes from its view (`read_scope` / `write_scope`, see
omniva/api/permissions.py). Writes send `{}` inside a savepoint that is rolled back, so
an allowed write leaves the objects in place for the next credential.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client as DjangoClient
from django.urls import URLPattern, URLResolver, get_resolver
from rest_framework.permissions import SAFE_METHODS

from engines import services as engine_services
from jobs import services as job_services
from omniva import live
from omniva import services as core_services
from omniva.api import views as core_views
from omniva.asgi import application
from omniva.models import AuditRecord, Clip, Creator, Project, Scope
from publishing import services as publishing_services
from publishing.models import Destination, Publication, Schedule
from tests.conftest import KeyHandle
from tests.jobs.test_grpc import Client as GrpcClient
from tests.jobs.test_grpc import (  # fixtures, used by name
    channel_to,  # noqa: F401
    client_for,  # noqa: F401
    grpc_port,  # noqa: F401
)

# Views anyone may call, with or without a key (API.md, Auth).
PUBLIC_VIEWS = (core_views.HealthView, core_views.InfoView)
CSRF_TOKEN = "abcdefghijklmnopqrstuvwxyz012345"  # a 32-character unmasked CSRF secret
REFUSED = {401, 403}
PATH_PARAMETER = re.compile(r"<(?:\w+:)?(?P<name>\w+)>")
WS_TIMEOUT = 10


# --- the endpoints, from the resolver ---------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    route: str  # "/v1/jobs/<str:job_id>"
    view: type
    method: str

    @property
    def public(self) -> bool:
        return issubclass(self.view, PUBLIC_VIEWS)

    @property
    def write(self) -> bool:
        return self.method.upper() not in SAFE_METHODS

    @property
    def scope(self) -> str | None:
        """The scope the view asks of a key (None: any valid key)."""
        name = "write_scope" if self.write else "read_scope"
        return getattr(self.view, name, Scope.ADMIN)

    @property
    def params(self) -> list[str]:
        return [match.group("name") for match in PATH_PARAMETER.finditer(self.route)]

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.route}"


def _v1_patterns() -> Iterator[tuple[str, URLPattern]]:
    for entry in get_resolver().url_patterns:
        if isinstance(entry, URLResolver) and str(entry.pattern) == "v1/":
            for pattern in entry.url_patterns:
                assert isinstance(pattern, URLPattern), pattern
                yield "/v1/" + str(pattern.pattern), pattern


def v1_endpoints() -> list[Endpoint]:
    endpoints = []
    for route, pattern in _v1_patterns():
        view = pattern.callback.view_class
        for method in view.http_method_names:
            if method not in ("head", "options") and hasattr(view, method):
                endpoints.append(Endpoint(route, view, method))
    return endpoints


ENDPOINTS = v1_endpoints()


def test_the_resolver_yields_every_app_s_endpoints() -> None:
    routes = {endpoint.route for endpoint in ENDPOINTS}

    # One of each app's, so that a change in how the routes are mounted cannot make
    # the matrix below silently empty.
    assert {"/v1/projects", "/v1/jobs", "/v1/engine-instances", "/v1/destinations"} <= routes
    assert len(ENDPOINTS) > 40


# --- the world the requests run against -------------------------------------------------------


@dataclass
class World:
    mine: Project
    theirs: Project
    # Objects of `theirs`, by model (and the job), that path parameters point at.
    objects: dict[type, Any]
    own: dict[type, Any]
    job: Any
    own_job: Any
    engine: Any
    event: Any
    engine_type: str


def _project_objects(project: Project, tag: str) -> dict[type, Any]:
    creator = core_services.creator_create(project=project, name=f"creator {tag}")
    clip = core_services.clip_create(project=project, title=f"clip {tag}", creator=creator)
    destination = publishing_services.destination_create(
        project=project,
        name=f"dest {tag}",
        kind="directory",
        config={"path": tag},
        secrets={"token": f"destination-secret-{tag}-Zq81"},
    )
    publication = publishing_services.publication_record(
        destination=destination, artifact=f"jobs/{tag}/a.txt"
    )
    schedule = publishing_services.schedule_create(project=project, pipeline="noop", interval_s=60)
    return {
        Project: project,
        Creator: creator,
        Clip: clip,
        Destination: destination,
        Publication: publication,
        Schedule: schedule,
    }


@pytest.fixture
def world(db: None) -> World:
    mine = core_services.project_create(name="mine")
    theirs = core_services.project_create(name="theirs")
    event_type = engine_services.event_type_create(name="matrix-event", engine_type="matrix")
    return World(
        mine=mine,
        theirs=theirs,
        objects=_project_objects(theirs, "theirs"),
        own=_project_objects(mine, "mine"),
        job=job_services.job_submit(pipeline="noop", project=theirs)[0],
        own_job=job_services.job_submit(pipeline="noop", project=mine)[0],
        engine=engine_services.engine_register(engine_type="matrix", name="matrix-1"),
        event=engine_services.event_create(event_type=event_type, data={"n": 1}),
        engine_type="matrix",
    )


def _model_of(view: type) -> type:
    model = getattr(view, "model", None)
    return model if model is not None else view.serializer_class.Meta.model


def fill(endpoint: Endpoint, world: World) -> tuple[str, bool]:
    """The endpoint's path with its parameters filled, and whether it names an object of
    the other project (`theirs`)."""
    foreign = False

    def value(match: re.Match[str]) -> str:
        nonlocal foreign
        name = match.group("name")
        if name == "pk":
            foreign = True
            return str(world.objects[_model_of(endpoint.view)].pk)
        if name == "job_id":
            foreign = True
            return str(world.job.pk)
        if name == "engine_id":
            return str(world.engine.pk)
        if name == "event_id":
            return str(world.event.pk)
        if name == "engine_type":
            return world.engine_type
        raise AssertionError(f"{endpoint}: teach fill() the path parameter {name!r}")

    return PATH_PARAMETER.sub(value, endpoint.route), foreign


# --- credentials --------------------------------------------------------------------------------


def send(client: DjangoClient, endpoint: Endpoint, path: str, **headers: str) -> Any:
    """One request, rolled back: an allowed write changes nothing for the next one."""
    with transaction.atomic():
        if endpoint.write:
            response = getattr(client, endpoint.method)(
                path, data="{}", content_type="application/json", **headers
            )
        else:
            response = getattr(client, endpoint.method)(path, **headers)
        transaction.set_rollback(True)
    return response


def session_client(*, staff: bool, name: str) -> DjangoClient:
    user = get_user_model().objects.create_user(name, password="pw-123456789", is_staff=staff)
    client = DjangoClient(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def error_code(response: Any) -> str | None:
    return (response.json().get("error") or {}).get("code")


def fits(key_scope: str, needed: str | None) -> bool:
    return needed is None or key_scope in (Scope.ADMIN, needed)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=str)
def test_every_endpoint_answers_each_credential_as_its_scope_says(
    endpoint: Endpoint, world: World, make_key: Callable[..., KeyHandle]
) -> None:
    client = DjangoClient()
    path, foreign = fill(endpoint, world)
    revoked = make_key(Scope.ADMIN, name="revoked")
    core_services.api_key_revoke(name="revoked")
    bound = make_key(Scope.ADMIN, project=world.mine, name="bound")

    no_key = send(client, endpoint, path)
    with_revoked = send(client, endpoint, path, **revoked.headers)
    if endpoint.public:
        assert no_key.status_code not in REFUSED, no_key.content
        assert with_revoked.status_code not in REFUSED
    else:
        assert (no_key.status_code, error_code(no_key)) == (401, "UNAUTHENTICATED")
        assert (with_revoked.status_code, error_code(with_revoked)) == (401, "UNAUTHENTICATED")

    for scope in Scope.values:
        response = send(client, endpoint, path, **make_key(scope, name=f"only-{scope}").headers)
        if endpoint.public or fits(scope, endpoint.scope):
            assert response.status_code not in REFUSED, (scope, response.content)
        else:
            assert response.status_code == 403, (scope, response.content)
            assert error_code(response) == "PERMISSION_DENIED"

    # A key bound to `mine`, with every scope, learns nothing of `theirs`' objects.
    as_bound = send(client, endpoint, path, **bound.headers)
    if getattr(endpoint.view, "unbound_only", False):  # spans every project: refused
        assert (as_bound.status_code, error_code(as_bound)) == (403, "PERMISSION_DENIED")
    elif foreign:
        assert as_bound.status_code == 404, as_bound.content
        assert error_code(as_bound).endswith("NOT_FOUND")
    else:
        assert as_bound.status_code != 401

    staff = session_client(staff=True, name="staff")
    as_staff = send(staff, endpoint, path)
    if endpoint.write and not endpoint.public:
        assert as_staff.status_code == 403, as_staff.content
        assert "CSRF" in as_staff.json()["error"]["message"]
        staff.cookies[settings.CSRF_COOKIE_NAME] = CSRF_TOKEN
        with_token = send(staff, endpoint, path, HTTP_X_CSRFTOKEN=CSRF_TOKEN)
        assert with_token.status_code not in REFUSED, with_token.content
    else:
        assert as_staff.status_code not in REFUSED, as_staff.content

    as_viewer = send(session_client(staff=False, name="viewer"), endpoint, path)
    if endpoint.public:
        assert as_viewer.status_code not in REFUSED
    else:
        assert as_viewer.status_code in REFUSED, as_viewer.content
        assert error_code(as_viewer) in {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def test_a_bound_key_s_lists_show_its_own_project_s_objects_and_none_of_another_s(
    world: World, make_key: Callable[..., KeyHandle]
) -> None:
    client = DjangoClient()
    bound = make_key(Scope.ADMIN, project=world.mine, name="bound")
    foreign_ids = {str(obj.pk) for obj in world.objects.values()} | {str(world.job.pk)}
    own_ids = {str(obj.pk) for obj in world.own.values()} | {str(world.own_job.pk)}
    seen = ""

    for endpoint in ENDPOINTS:
        if endpoint.method != "get" or endpoint.params:
            continue
        response = send(client, endpoint, endpoint.route, **bound.headers)
        if getattr(endpoint.view, "unbound_only", False):
            # Engines, events and the audit trail span every project: refused outright.
            assert response.status_code == 403, (str(endpoint), response.content)
            continue
        assert response.status_code not in REFUSED, (str(endpoint), response.content)
        body = response.content.decode()
        leaked = {item for item in foreign_ids if item in body}
        assert not leaked, f"{endpoint} shows another project's {leaked}"
        seen += body

    assert {item for item in own_ids if item not in seen} == set()


# --- secrets -----------------------------------------------------------------------------------


@pytest.fixture
def every_log_record(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog at DEBUG on every logger, including those the settings quiet."""
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_secrets_appear_in_no_response_log_record_or_audit_record(
    world: World, make_key: Callable[..., KeyHandle], every_log_record: Any
) -> None:
    client = DjangoClient()
    admin = make_key(Scope.ADMIN, name="admin")
    reader = make_key(Scope.JOBS_READ, name="reader")
    revoked = make_key(Scope.ADMIN, name="revoked")
    core_services.api_key_revoke(name="revoked")
    forged = admin.secret[:-6] + "XXXXXX"
    destination_secret = "whsec-Vq9Lz3-never-shown"
    rotated_secret = "whsec-rotated-K7u2-never-shown"
    stored_secret = world.objects[Destination].secrets["token"]
    bodies: list[str] = []

    def call(method: str, path: str, body: Any = None, **headers: str) -> Any:
        kwargs: dict[str, Any] = dict(headers)
        if body is not None:
            kwargs.update(data=json.dumps(body), content_type="application/json")
        response = getattr(client, method)(path, **kwargs)
        bodies.append(response.content.decode())
        return response

    made = call(
        "post",
        "/v1/destinations",
        {
            "project": str(world.mine.pk),
            "name": "hook",
            "kind": "webhook",
            "config": {"url": "https://example.test/hook"},
            "secrets": {"signing": destination_secret},
        },
        **admin.headers,
    )
    assert made.status_code == 201, made.content
    made_id = made.json()["data"]["id"]
    call("patch", f"/v1/destinations/{made_id}", {"secrets": {"signing": rotated_secret}},
         **admin.headers)  # fmt: skip
    call("get", f"/v1/destinations/{made_id}", **admin.headers)
    call("get", f"/v1/destinations/{world.objects[Destination].pk}", **admin.headers)
    call("get", "/v1/destinations", **admin.headers)
    # Errors: a bad destination carrying a secret, a wrong scope, a forged and a revoked key.
    refused_body = call(
        "post",
        "/v1/destinations",
        {"project": str(world.mine.pk), "name": "bad", "kind": "nope",
         "secrets": {"signing": destination_secret}},
        **admin.headers,
    )  # fmt: skip
    assert refused_body.status_code == 400
    assert call("get", "/v1/destinations", **reader.headers).status_code == 403
    assert call("get", "/v1/jobs", HTTP_X_API_KEY=forged).status_code == 401
    assert call("get", "/v1/jobs", **revoked.headers).status_code == 401
    call("get", "/v1/audit", **admin.headers)
    call("get", "/v1/audit?key=admin", **admin.headers)

    secrets = {
        admin.secret,
        admin.secret.split("_", 2)[2],
        reader.secret,
        revoked.secret,
        forged,
        destination_secret,
        rotated_secret,
        stored_secret,
    }
    audit = json.dumps(list(AuditRecord.objects.values()), default=str)
    logged = "\n".join(
        record.getMessage() + repr(record.args) + repr(record.__dict__)
        for record in every_log_record.records
    )
    assert AuditRecord.objects.count() >= len(bodies)
    for secret in secrets:
        assert all(secret not in body for body in bodies), secret
        assert secret not in audit, secret
        assert secret not in logged, secret


# --- websockets ---------------------------------------------------------------------------------


@pytest.fixture
def fresh_channel_layer() -> Iterator[None]:
    """Each scenario runs on its own loop; the in-memory layer's queues belong to one."""
    channel_layers.backends = {}
    yield
    channel_layers.backends = {}


async def ws_outcome(path: str, headers: list[tuple[bytes, bytes]]) -> str | int:
    """ "snapshot" when the socket is served, else the code it is closed with."""
    ws = WebsocketCommunicator(application, path, headers=[(b"host", b"localhost"), *headers])
    connected, _ = await ws.connect(timeout=WS_TIMEOUT)
    assert connected
    first = await ws.receive_output(timeout=WS_TIMEOUT)
    await ws.disconnect()
    if first["type"] == "websocket.close":
        return first["code"]
    return json.loads(first["text"])["type"]


def session_cookie(*, staff: bool, name: str) -> bytes:
    name_of_cookie = settings.SESSION_COOKIE_NAME
    client = session_client(staff=staff, name=name)
    return f"{name_of_cookie}={client.cookies[name_of_cookie].value}".encode()


@pytest.mark.django_db(transaction=True)
def test_the_websockets_answer_each_credential_as_their_scope_says(
    make_key: Callable[..., KeyHandle], fresh_channel_layer: None, every_log_record: Any
) -> None:
    mine = Project.objects.create(name="mine")
    theirs = Project.objects.create(name="theirs")
    their_job = job_services.job_submit(pipeline="noop", project=theirs)[0]
    revoked = make_key(Scope.ADMIN, name="revoked")
    core_services.api_key_revoke(name="revoked")
    keys = {scope: make_key(scope, name=f"ws-{scope}").secret for scope in Scope.values}
    bound = make_key(Scope.ADMIN, project=mine, name="bound").secret
    staff = session_cookie(staff=True, name="staff")
    viewer = session_cookie(staff=False, name="viewer")
    site = (b"origin", b"http://localhost")
    paths = {"events": "/ws/events", "job": f"/ws/jobs/{their_job.pk}"}
    cases: list[tuple[str, str, list[tuple[bytes, bytes]], str | int]] = []
    for name, path in paths.items():
        cases += [
            (name, path, [], 4001),
            (name, f"{path}?token={revoked.secret}", [], 4001),
            (name, f"{path}?token=omv_000000000000_forged", [], 4001),
            (name, path, [(b"cookie", staff), site], "snapshot"),
            # A session from another site's page (or none named) is not this site's.
            (name, path, [(b"cookie", staff), (b"origin", b"https://evil.example")], 4003),
            (name, path, [(b"cookie", staff)], 4003),
            (name, path, [(b"cookie", viewer), site], 4003),
        ]
        for scope, secret in keys.items():
            expected = "snapshot" if fits(scope, Scope.JOBS_READ) else 4003
            cases.append((name, f"{path}?token={secret}", [], expected))
    cases += [
        ("events", f"/ws/events?token={bound}", [], "snapshot"),
        ("job", f"/ws/jobs/{their_job.pk}?token={bound}", [], 4004),
        ("events", f"/ws/events?token={bound}&project={theirs.pk}", [], 4003),
    ]

    async def scenario() -> list[str | int]:
        try:
            return [await ws_outcome(path, headers) for _, path, headers, _ in cases]
        finally:
            await live.feed.stop()

    outcomes = async_to_sync(scenario)()

    wrong = [
        (path.replace(bound, "<bound>"), headers, expected, got)
        for (_, path, headers, expected), got in zip(cases, outcomes, strict=True)
        if expected != got
    ]
    assert wrong == []
    logged = "\n".join(repr(record.__dict__) for record in every_log_record.records)
    assert not [secret for secret in [*keys.values(), bound] if secret in logged]


# --- gRPC ---------------------------------------------------------------------------------------

GRPC_SCOPES = {
    "SubmitTask": Scope.JOBS_WRITE,
    "GetTaskStatus": Scope.JOBS_READ,
    "StreamTaskUpdates": Scope.JOBS_READ,
    "CancelTask": Scope.JOBS_WRITE,
}
AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


def grpc_outcome(client: GrpcClient, method: str, task_id: str) -> grpc.StatusCode:
    """OK, or the status code the call is refused with (a stream: its first message)."""
    try:
        if method == "SubmitTask":
            client.submit(task_type="noop")
        elif method == "GetTaskStatus":
            client.status(task_id)
        elif method == "StreamTaskUpdates":
            stream = client.stream(task_id)
            next(stream)
            stream.cancel()
        else:
            client.cancel(task_id)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.django_db(transaction=True)
def test_each_grpc_method_answers_each_credential_as_its_scope_says(
    make_key: Callable[..., KeyHandle],
    client_for: Callable[..., GrpcClient],  # noqa: F811
    every_log_record: Any,
) -> None:
    mine = Project.objects.create(name="mine")
    theirs = Project.objects.create(name="theirs")
    revoked = make_key(Scope.ADMIN, name="revoked")
    core_services.api_key_revoke(name="revoked")
    bound_key = make_key(Scope.ADMIN, project=mine, name="bound")
    bound = client_for(bound_key)
    presented = [bound_key]
    wrong: list[tuple[str, str, Any]] = []

    def expect(who: str, client: GrpcClient, method: str, task_id: str, allowed: Any) -> None:
        got = grpc_outcome(client, method, task_id)
        ok = got not in AUTH_CODES if allowed is True else got == allowed
        if not ok:
            wrong.append((who, method, got))

    for method in GRPC_SCOPES:
        task_id = str(job_services.job_submit(pipeline="noop", project=theirs)[0].pk)
        expect("no key", client_for(None), method, task_id, grpc.StatusCode.UNAUTHENTICATED)
        expect("revoked", client_for(revoked), method, task_id, grpc.StatusCode.UNAUTHENTICATED)
        for scope in Scope.values:
            presented.append(make_key(scope, name=f"grpc-{method}-{scope}"))
            client = client_for(presented[-1])
            allowed = fits(scope, GRPC_SCOPES[method]) or grpc.StatusCode.PERMISSION_DENIED
            expect(scope, client, method, task_id, allowed)
        if method != "SubmitTask":
            expect("bound", bound, method, task_id, grpc.StatusCode.NOT_FOUND)

    expect("bound", bound, "SubmitTask", "", True)

    assert wrong == []
    logged = "\n".join(repr(record.__dict__) for record in every_log_record.records)
    assert revoked.secret not in logged
    assert not [key.secret for key in presented if key.secret in logged]
