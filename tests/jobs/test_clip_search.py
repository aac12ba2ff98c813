"""Clip embeddings made on the gpu queue, and semantic search over them (pgvector)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import connection

from jobs import services as job_services
from jobs import testing
from jobs.models import Job, JobStatus
from omniva import services
from omniva.models import Clip, Project, Scope
from tests.conftest import KeyHandle, wait_for

CAT = ("A cat sleeps on the sofa", "the little cat purrs and naps all afternoon")
KITTEN = ("Kitten nap time", "a young kitten curls up and sleeps on a cushion")
TAXES = ("Filing quarterly taxes", "how to fill in the VAT return before the deadline")


def clip(project: Project, text: tuple[str, str]) -> Clip:
    return services.clip_create(project=project, title=text[0], transcript=text[1])


@pytest.mark.django_db
def test_clips_are_embedded_on_the_gpu_queue_and_similar_ranks_the_related_one_first(
    drain: Callable[..., Any], api: Any
) -> None:
    project = Project.objects.create(name="pets")
    cat, kitten, taxes = (clip(project, text) for text in (CAT, KITTEN, TAXES))
    elsewhere = clip(Project.objects.create(name="other"), KITTEN)
    drain("gpu")
    for each in (cat, kitten, taxes, elsewhere):
        each.refresh_from_db()
        assert each.embedding is not None
        assert len(each.embedding) == 384
    found = api.get(f"/v1/clips/{cat.pk}/similar?limit=5").json()["data"]
    # Same project only, the cat clip itself left out, the kitten first.
    assert [m["clip"]["id"] for m in found] == [str(kitten.pk), str(taxes.pk)]
    assert found[0]["score"] > found[1]["score"] + 0.2


@pytest.mark.django_db
def test_an_embedding_of_an_old_text_is_not_stored_over_the_new_one(
    drain: Callable[..., Any],
) -> None:
    project = Project.objects.create(name="p")
    item = clip(project, CAT)
    old_text = item.text_for_embedding()
    services.clip_update(clip=item, changes={"title": "Quarterly taxes", "transcript": ""})
    # A job that read the old text stores its vector after the change: refused.
    assert not services.clip_embedding_store(clip_id=item.pk, text=old_text, vector=[0.1] * 384)
    item.refresh_from_db()
    assert item.embedding is None
    drain("gpu")
    item.refresh_from_db()
    assert item.embedded_text == services.sha256_hex("Quarterly taxes")
    assert item.embedding is not None


@pytest.fixture
def gpu_worker() -> Iterator[None]:
    """An in-process gpu worker on a thread (its own connection), for requests that
    wait on the gpu queue."""
    stop = threading.Event()

    def work() -> None:
        try:
            while not stop.is_set():
                claimed = testing.claim_delivery("gpu")
                if claimed is None:
                    stop.wait(0.02)  # the queue is empty: look again shortly
                    continue
                testing.run_delivery(*claimed)
        finally:
            connection.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


@pytest.mark.django_db(transaction=True)
def test_search_embeds_the_query_on_the_gpu_queue_and_ranks_by_meaning(
    api: Any, gpu_worker: None, client: Any, make_key: Callable[..., KeyHandle]
) -> None:
    project = Project.objects.create(name="pets")
    cat, _kitten, taxes = (clip(project, text) for text in (CAT, KITTEN, TAXES))
    elsewhere = Project.objects.create(name="elsewhere")
    their_cat = clip(elsewhere, CAT)

    def embedded() -> bool:
        return not Clip.objects.filter(embedding__isnull=True).exists()

    wait_for(embedded, timeout=60, what="the clips' embeddings")
    response = api.get(f"/v1/clips/search?q=a+sleepy+cat&project={project.pk}&limit=3")
    assert response.status_code == 200, response.json()
    found = response.json()["data"]
    assert found[0]["clip"]["id"] == str(cat.pk)
    assert found[-1]["clip"]["id"] == str(taxes.pk)
    query_jobs = Job.objects.filter(pipeline="embed_texts")
    assert [job.status for job in query_jobs] == [JobStatus.COMPLETED]
    # A key bound to the project searches it, whatever project it names.
    bound = make_key(Scope.CONTENT, project=project).headers
    scoped = client.get(f"/v1/clips/search?q=a+sleepy+cat&project={elsewhere.pk}", **bound)
    ids = [hit["clip"]["id"] for hit in scoped.json()["data"]]
    assert str(cat.pk) in ids
    assert str(their_cat.pk) not in ids


@pytest.mark.django_db(transaction=True)
def test_search_with_no_gpu_worker_answers_503_and_cancels_its_job(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_services.lifecycle, "QUERY_EMBEDDING_TIMEOUT_S", 0.3)
    response = api.get("/v1/clips/search?q=anything")
    assert (response.status_code, response.json()["error"]["code"]) == (
        503,
        "SERVICE_UNAVAILABLE",
    )
    assert Job.objects.get(pipeline="embed_texts").status == JobStatus.CANCELLED


@pytest.mark.django_db
def test_search_refuses_a_missing_query_and_an_unknown_project(api: Any) -> None:
    assert api.get("/v1/clips/search").json()["error"]["code"] == "VALIDATION_ERROR"
    unknown = api.get("/v1/clips/search?q=x&project=00000000-0000-0000-0000-000000000000")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "PROJECT_NOT_FOUND")
    assert not Job.objects.exists()
