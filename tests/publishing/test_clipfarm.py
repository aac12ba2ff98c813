"""The `clipfarm` pipeline end to end through the in-process worker (`drain`): a feed and
its videos served from 127.0.0.1, a folder under the ingest root, a direct media URL;
the real embedding model, the real ffmpeg, real destinations (a folder, a signed
webhook on 127.0.0.1)."""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from django.test import override_settings
from PIL import Image

from jobs import services as job_services
from jobs.models import Job, JobStatus
from jobs.pipelines.lib import video
from jobs.pipelines.lib.inference import models
from omniva import services as core_services
from omniva.errors import ErrorCode, OmnivaError
from omniva.models import Clip, ClipStatus, Creator, Project
from publishing.models import Destination, Publication, PublicationStatus
from publishing.pipelines.clipfarm import DUPLICATE_SIMILARITY, keywords
from tests.jobs.test_video import make_video
from tests.publishing.conftest import SECRET, FakeWebhook

pytestmark = pytest.mark.django_db


# --- what the tests serve and where they look ----------------------------------------------


class MediaServer(http.server.ThreadingHTTPServer):
    """Serves `routes` (path → (content type, body)) and counts the requests per path;
    a path in `unavailable` answers 503 that many times first."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.hits: dict[str, int] = {}
        self.unavailable: dict[str, int] = {}
        super().__init__(("127.0.0.1", 0), _MediaHandler)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    server: MediaServer

    def do_GET(self) -> None:
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        content_type, body = self.server.routes.get(self.path, ("text/plain", b""))
        status = 200 if self.path in self.server.routes else 404
        if self.server.unavailable.get(self.path):
            self.server.unavailable[self.path] -= 1
            status, body = 503, b""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class FeedItem:
    title: str
    description: str = ""
    enclosure: str | None = None  # a path on the media server, or a URL
    kind: str = "video/mp4"


def rss(server: MediaServer, items: list[FeedItem]) -> bytes:
    entries = []
    for item in items:
        enclosure = ""
        if item.enclosure is not None:
            url = item.enclosure if "://" in item.enclosure else server.url(item.enclosure)
            enclosure = f'<enclosure url="{escape(url)}" type="{item.kind}" length="1"/>'
        entries.append(
            f"<item><title>{escape(item.title)}</title>"
            f"<description>{escape(item.description)}</description>{enclosure}</item>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
        f"<title>Creator feed</title>{''.join(entries)}</channel></rss>"
    ).encode()


@pytest.fixture(scope="session")
def clip_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Tiny videos, made once: 3 s with sound, 2 s without."""
    folder = tmp_path_factory.mktemp("videos")
    return {
        "sound": make_video(folder / "sound.mp4", seconds=3).read_bytes(),
        "silent": make_video(folder / "silent.mp4", seconds=2, audio=False).read_bytes(),
    }


@dataclass
class Places:
    media: Path
    ingest: Path
    publish: Path


@pytest.fixture
def places(tmp_path: Path) -> Iterator[Places]:
    here = Places(media=tmp_path / "media", ingest=tmp_path / "ingest", publish=tmp_path / "pub")
    here.ingest.mkdir()
    with override_settings(
        MEDIA_ROOT=here.media,
        OMNIVA_INGEST_ROOT=here.ingest,
        OMNIVA_PUBLISH_ROOT=here.publish,
        OMNIVA_GPU_MAX_WAIT_MS=0,
    ):
        yield here


@pytest.fixture
def server() -> Iterator[MediaServer]:
    served = MediaServer()
    threading.Thread(target=served.serve_forever, daemon=True).start()
    yield served
    served.shutdown()
    served.server_close()


@pytest.fixture
def private_urls() -> Iterator[None]:
    with override_settings(OMNIVA_ALLOW_PRIVATE_URLS=True):
        yield


@pytest.fixture
def project() -> Project:
    return Project.objects.create(name="shorts")


@pytest.fixture
def folder_destination(project: Project) -> Destination:
    return Destination.objects.create(
        project=project, name="a-folder", kind="directory", config={"path": "shorts"}
    )


@pytest.fixture
def hook_destination(project: Project, webhook: FakeWebhook) -> Destination:
    return Destination.objects.create(
        project=project,
        name="b-hook",
        kind="webhook",
        config={"url": webhook.url},
        secrets={"secret": SECRET},
    )


@pytest.fixture(autouse=True)
def fresh_batch_stats() -> None:
    """The model stays loaded across tests (as in a worker); its statistics do not."""
    models.stats.clear()


def run_clipfarm(drain: Callable[..., Any], project: Project | None, **params: Any) -> Job:
    """Submit, then work the queues as the default and gpu workers would."""
    job, _ = job_services.job_submit(pipeline="clipfarm", params=params, project=project)
    drain("default")  # ingest
    drain("gpu")  # clipfarm's embed, and the clip_embed jobs that ingesting queued
    drain("default")  # analyze → edit → publish
    job.refresh_from_db()
    return job


def serve_feed(server: MediaServer, clip_bytes: dict[str, bytes], items: list[FeedItem]) -> str:
    for item in items:
        if item.enclosure and "://" not in item.enclosure:
            server.routes[item.enclosure] = ("video/mp4", clip_bytes["sound"])
    server.routes["/feed.xml"] = ("application/rss+xml", rss(server, items))
    return server.url("/feed.xml")


def stored(places: Places, reference: str) -> Path:
    assert reference.startswith("/media/")
    return places.media / reference.removeprefix("/media/")


FEED = [
    FeedItem(
        "Surfing the morning swell",
        "<p>We paddle out at dawn &amp; catch the <b>morning swell</b> at the reef.</p>",
        "/videos/surf.mp4",
    ),
    FeedItem("Baking sourdough bread", "Folding the dough, proofing overnight.", "/v/bread.mp4"),
    FeedItem("A text-only post", "No video in this one."),
]


# --- a feed --------------------------------------------------------------------------------


def test_a_feed_is_ingested_embedded_analyzed_edited_and_published_to_every_destination(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    folder_destination: Destination,
    hook_destination: Destination,
    webhook: FakeWebhook,
) -> None:
    feed_url = serve_feed(server, clip_bytes, FEED)
    job = run_clipfarm(drain, project, source_url=feed_url, max_duration_s=2)

    assert job.status == JobStatus.COMPLETED, job.error
    result = job.result
    surf = Clip.objects.get(source_url=server.url("/videos/surf.mp4"))
    bread = Clip.objects.get(source_url=server.url("/v/bread.mp4"))
    assert result["ingested"] == [str(surf.pk), str(bread.pk)]
    assert (result["skipped"], result["duplicates"], result["kind"]) == (0, [], "feed")
    assert [r["code"] for r in result["rejected"]] == ["NO_MEDIA"]  # the text-only post
    assert sorted(result["analyzed"]) == sorted(result["ingested"])

    assert surf.project == project
    assert surf.title == "Surfing the morning swell"
    assert surf.transcript == "We paddle out at dawn & catch the morning swell at the reef."
    assert surf.status == ClipStatus.PUBLISHED
    assert {"swell", "morning"} <= set(surf.analysis["keywords"])
    assert surf.analysis["duplicate_of"] is None
    assert surf.analysis["media"]["duration_s"] == pytest.approx(3.0, abs=0.05)
    assert (surf.analysis["media"]["width"], surf.analysis["media"]["height"]) == (320, 240)
    assert surf.embedding is not None
    assert surf.embedded_text == core_services.sha256_hex(surf.text_for_embedding())

    # Edited: 1080x1920 H.264/AAC, cut to max_duration_s, with a JPEG thumbnail.
    edited = {item["clip_id"]: item for item in result["edited"]}
    assert edited[str(surf.pk)] == {
        "clip_id": str(surf.pk),
        "media_url": f"/media/clips/{surf.pk}/clip.mp4",
        "thumbnail_url": f"/media/clips/{surf.pk}/thumbnail.jpg",
        "duration_s": surf.duration_s,
    }
    assert surf.media_url == f"/media/clips/{surf.pk}/clip.mp4"
    info = video.probe(stored(places, surf.media_url))
    assert (info.width, info.height, info.video_codec, info.audio_codec) == (
        1080, 1920, "h264", "aac",
    )  # fmt: skip
    assert info.duration_s == pytest.approx(2.0, abs=0.1) == surf.duration_s
    assert Image.open(stored(places, surf.analysis["thumbnail"])).format == "JPEG"

    # Published once to each destination: the folder has the video, the webhook the item.
    publications = Publication.objects.filter(clip__in=[surf, bread])
    assert publications.count() == 4
    assert {p.status for p in publications} == {PublicationStatus.PUBLISHED}
    assert len(result["publications"]) == 4
    surf_key = publications.get(clip=surf, destination=folder_destination).idempotency_key
    exported = places.publish / "shorts" / f"{surf_key}.mp4"
    assert exported.read_bytes() == stored(places, surf.media_url).read_bytes()
    assert json.loads((places.publish / "shorts" / f"{surf_key}.json").read_text())["title"] == (
        "Surfing the morning swell"
    )
    assert sorted(item["item"]["title"] for item in webhook.items.values()) == [
        "Baking sourdough bread", "Surfing the morning swell",
    ]  # fmt: skip
    assert webhook.bad_signatures == 0


def test_each_clips_text_is_embedded_once_though_clip_embed_and_clipfarm_both_ask(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    private_urls: None,
) -> None:
    feed_url = serve_feed(server, clip_bytes, FEED)
    job = run_clipfarm(drain, project, source_url=feed_url, publish=False)
    assert job.status == JobStatus.COMPLETED, job.error
    # clip_ingest queued a clip_embed job per clip, ahead of clipfarm's own embed stage:
    # they embedded the two texts in one pass, and the stage found the vectors made.
    assert models.stats["embed"].items == 2
    embed_jobs = Job.objects.filter(pipeline="clip_embed")
    assert [j.result["outcome"] for j in embed_jobs] == ["stored", "stored"]
    assert job.stages.get(name="embed").output == {
        "embedded": [], "current": job.result["ingested"], "not_embedded": [],
    }  # fmt: skip
    # The other way round: a clip_embed job for a clip whose vector is current does
    # not run the model.
    again, _ = job_services.job_submit(
        pipeline="clip_embed", params={"clip_id": job.result["ingested"][0]}, project=project
    )
    drain("gpu")
    again.refresh_from_db()
    assert (again.result["outcome"], again.result["stored"]) == ("current", False)
    assert models.stats["embed"].items == 2


def test_running_it_again_ingests_nothing_new_and_downloads_and_publishes_nothing_again(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    hook_destination: Destination,
    webhook: FakeWebhook,
) -> None:
    feed_url = serve_feed(server, clip_bytes, FEED)
    first = run_clipfarm(drain, project, source_url=feed_url)
    assert first.status == JobStatus.COMPLETED, first.error
    assert webhook.requests == 2

    again = run_clipfarm(drain, project, source_url=feed_url)
    assert again.status == JobStatus.COMPLETED, again.error
    assert (again.result["ingested"], again.result["skipped"]) == ([], 2)
    assert (again.result["edited"], again.result["publications"]) == ([], [])
    assert Clip.objects.count() == 2
    assert server.hits["/feed.xml"] == 2
    assert (server.hits["/videos/surf.mp4"], server.hits["/v/bread.mp4"]) == (1, 1)
    assert webhook.requests == 2
    assert Publication.objects.count() == 2


def test_max_clips_caps_the_new_clips_and_the_next_run_takes_the_rest(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    private_urls: None,
) -> None:
    feed_url = serve_feed(server, clip_bytes, FEED)
    first = run_clipfarm(drain, project, source_url=feed_url, max_clips=1, publish=False)
    assert first.status == JobStatus.COMPLETED, first.error
    [surf] = first.result["ingested"]
    assert Clip.objects.get(pk=surf).title == "Surfing the morning swell"
    assert "/v/bread.mp4" not in server.hits  # not fetched beyond the cap
    second = run_clipfarm(drain, project, source_url=feed_url, max_clips=1, publish=False)
    assert second.status == JobStatus.COMPLETED, second.error
    assert second.result["skipped"] == 1
    assert Clip.objects.get(pk=second.result["ingested"][0]).title == "Baking sourdough bread"


def test_a_near_duplicate_of_a_clip_of_the_project_is_marked_and_not_edited_or_published(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    folder_destination: Destination,
    private_urls: None,
) -> None:
    original = core_services.clip_create(
        project=project,
        title="Surfing the morning swell",
        transcript="We paddle out at dawn & catch the morning swell at the reef.",
    )
    drain("gpu")  # its clip_embed job
    original.refresh_from_db()
    assert original.embedding is not None
    other_project = Project.objects.create(name="elsewhere")
    core_services.clip_create(
        project=other_project,
        title="Baking sourdough bread",
        transcript="Folding the dough, proofing overnight.",
    )
    drain("gpu")

    feed_url = serve_feed(server, clip_bytes, FEED)
    job = run_clipfarm(drain, project, source_url=feed_url)

    assert job.status == JobStatus.COMPLETED, job.error
    surf = Clip.objects.get(source_url=server.url("/videos/surf.mp4"))
    bread = Clip.objects.get(source_url=server.url("/v/bread.mp4"))
    [duplicate] = job.result["duplicates"]
    assert (duplicate["clip_id"], duplicate["duplicate_of"]) == (str(surf.pk), str(original.pk))
    assert duplicate["similarity"] >= DUPLICATE_SIMILARITY
    assert surf.analysis["duplicate_of"] == str(original.pk)
    assert (surf.status, surf.media_url) == (ClipStatus.ANALYZED, "")
    assert not Publication.objects.filter(clip=surf).exists()
    # Another project's clip is no original of this one's.
    assert bread.analysis["duplicate_of"] is None
    assert bread.status == ClipStatus.PUBLISHED
    assert [item["clip_id"] for item in job.result["edited"]] == [str(bread.pk)]


def test_a_failing_destination_fails_publish_and_the_retry_sends_only_what_is_missing(
    drain: Callable[..., Any],
    due: Callable[[Job], None],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    folder_destination: Destination,
    hook_destination: Destination,
    webhook: FakeWebhook,
) -> None:
    feed_url = serve_feed(server, clip_bytes, FEED[:1])
    webhook.fail_next = 1
    job = run_clipfarm(drain, project, source_url=feed_url)
    assert job.status == JobStatus.RETRYING
    publish_stage = job.stages.get(name="publish")
    assert publish_stage.error["code"] == "UPLOAD_FAILED"
    clip = Clip.objects.get()
    assert clip.status == ClipStatus.EDITED
    due(job)
    drain("default")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    clip.refresh_from_db()
    assert clip.status == ClipStatus.PUBLISHED
    to_folder = Publication.objects.get(destination=folder_destination)
    to_hook = Publication.objects.get(destination=hook_destination)
    assert (to_folder.attempts, to_hook.attempts) == (1, 2)
    assert len(webhook.items) == 1
    assert job.stages.get(name="edit").attempt == 1  # only publish ran again


def test_a_retried_ingest_takes_up_the_clips_its_failed_attempt_made(
    drain: Callable[..., Any],
    due: Callable[[Job], None],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    private_urls: None,
) -> None:
    feed_url = serve_feed(server, clip_bytes, FEED)
    server.unavailable["/v/bread.mp4"] = 1  # the second video's host is busy once
    job, _ = job_services.job_submit(
        pipeline="clipfarm", params={"source_url": feed_url, "publish": False}, project=project
    )
    drain("default")
    job.refresh_from_db()
    assert job.status == JobStatus.RETRYING
    assert job.stages.get(name="ingest").error["code"] == "FETCH_UNAVAILABLE"
    assert Clip.objects.count() == 1  # the first entry's clip, made before the failure
    due(job)
    drain("default")
    drain("gpu")
    drain("default")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    clips = list(Clip.objects.order_by("created_at"))
    assert job.result["ingested"] == [str(clip.pk) for clip in clips]
    assert job.result["skipped"] == 0
    assert {clip.status for clip in clips} == {ClipStatus.EDITED}
    assert server.hits["/videos/surf.mp4"] == 1  # not fetched again


def test_a_feed_at_a_private_address_is_refused_and_never_requested(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
) -> None:
    feed_url = serve_feed(server, clip_bytes, FEED)
    job = run_clipfarm(drain, project, source_url=feed_url)
    assert job.status == JobStatus.FAILED
    assert (job.error["code"], job.attempts) == ("URL_NOT_ALLOWED", 1)
    assert server.hits == {}
    assert not Clip.objects.exists()


def test_media_urls_in_a_feed_are_checked_and_a_refused_one_skips_only_its_entry(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    private_urls: None,
) -> None:
    items = [
        FeedItem("Local file", enclosure="file:///etc/passwd"),
        FeedItem("Over ftp", enclosure="ftp://127.0.0.1/clip.mp4"),
        FeedItem("Not a video", enclosure="/not-a-video.mp4"),
        FeedItem("Surfing the morning swell", enclosure="/videos/surf.mp4"),
    ]
    feed_url = serve_feed(server, clip_bytes, items)
    server.routes["/not-a-video.mp4"] = ("video/mp4", b"<html>sorry</html>")
    job = run_clipfarm(drain, project, source_url=feed_url, publish=False)
    assert job.status == JobStatus.COMPLETED, job.error
    assert [(r["source_url"], r["code"]) for r in job.result["rejected"]] == [
        ("file:///etc/passwd", "URL_NOT_ALLOWED"),
        ("ftp://127.0.0.1/clip.mp4", "URL_NOT_ALLOWED"),
        (server.url("/not-a-video.mp4"), "INVALID_MEDIA"),
    ]
    assert [c.title for c in Clip.objects.all()] == ["Surfing the morning swell"]
    assert Clip.objects.get().status == ClipStatus.EDITED
    # The rejected download is not left behind in the job's files.
    kept = (places.media / "jobs" / str(job.pk)).glob("source-*")
    assert [path.suffix for path in kept] == [".mp4"]


# --- a folder ------------------------------------------------------------------------------


def test_a_creators_folder_under_the_ingest_root_is_ingested_with_sidecar_transcripts(
    drain: Callable[..., Any],
    places: Places,
    clip_bytes: dict[str, bytes],
    project: Project,
    folder_destination: Destination,
) -> None:
    folder = places.ingest / "alice"
    folder.mkdir()
    (folder / "kite_lesson.mp4").write_bytes(clip_bytes["sound"])
    (folder / "kite_lesson.txt").write_text("Steering the kite through the wind window.")
    (folder / "quiet-harbour.mov").write_bytes(clip_bytes["silent"])
    (folder / "notes.md").write_text("not a video")
    (folder / "broken.mp4").write_bytes(b"this is no video")
    creator = Creator.objects.create(project=project, name="Alice", source_url="alice")

    job = run_clipfarm(drain, project, creator=str(creator.pk), max_duration_s=5)

    assert job.status == JobStatus.COMPLETED, job.error
    assert job.result["kind"] == "folder"
    assert [(r["source_url"], r["code"]) for r in job.result["rejected"]] == [
        ("alice/broken.mp4", "INVALID_MEDIA")
    ]
    kite = Clip.objects.get(source_url="alice/kite_lesson.mp4")
    harbour = Clip.objects.get(source_url="alice/quiet-harbour.mov")
    assert (kite.creator, kite.title, kite.transcript) == (
        creator, "kite lesson", "Steering the kite through the wind window.",
    )  # fmt: skip
    assert kite.analysis["keywords"][:1] == ["kite"]
    assert (harbour.title, harbour.transcript, harbour.creator) == ("quiet harbour", "", creator)
    for clip in (kite, harbour):
        assert clip.status == ClipStatus.PUBLISHED
        info = video.probe(stored(places, clip.media_url))
        assert (info.width, info.height, info.audio_codec) == (1080, 1920, "aac")
    assert harbour.duration_s == pytest.approx(2.0, abs=0.1)  # shorter than max_duration_s
    # The folder's files are read where they are, not copied into the job.
    assert not list((places.media / "jobs" / str(job.pk)).glob("source-*"))
    assert (folder / "kite_lesson.mp4").read_bytes() == clip_bytes["sound"]

    again = run_clipfarm(drain, project, creator=str(creator.pk))
    assert (again.result["ingested"], again.result["skipped"]) == ([], 2)


def test_a_clip_whose_source_is_gone_before_the_edit_fails_alone(
    drain: Callable[..., Any],
    places: Places,
    clip_bytes: dict[str, bytes],
    project: Project,
    folder_destination: Destination,
) -> None:
    folder = places.ingest / "alice"
    folder.mkdir()
    (folder / "first.mp4").write_bytes(clip_bytes["silent"])
    (folder / "second.mp4").write_bytes(clip_bytes["silent"])
    job, _ = job_services.job_submit(
        pipeline="clipfarm", params={"source_url": "alice"}, project=project
    )
    drain("default")
    drain("gpu")
    (folder / "first.mp4").unlink()  # removed from the folder while the job runs
    drain("default")
    job.refresh_from_db()
    assert job.status == JobStatus.COMPLETED, job.error
    first = Clip.objects.get(source_url="alice/first.mp4")
    second = Clip.objects.get(source_url="alice/second.mp4")
    assert job.result["failed"] == [
        {
            "clip_id": str(first.pk),
            "code": "FILE_NOT_FOUND",
            "message": first.analysis["error"]["message"],
        }
    ]
    assert (first.status, first.media_url) == (ClipStatus.FAILED, "")
    assert not Publication.objects.filter(clip=first).exists()
    assert second.status == ClipStatus.PUBLISHED


@pytest.mark.parametrize("where", ["../outside", "absolute", "link-out", "alice/../../outside"])
def test_a_path_escaping_the_ingest_root_is_refused_and_nothing_is_made(
    drain: Callable[..., Any],
    places: Places,
    clip_bytes: dict[str, bytes],
    project: Project,
    where: str,
) -> None:
    outside = places.ingest.parent / "outside"
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(clip_bytes["sound"])
    (places.ingest / "alice").mkdir()
    os.symlink(outside, places.ingest / "link-out")
    source = {"absolute": str(outside)}.get(where, where)

    job = run_clipfarm(drain, project, source_url=source)

    assert job.status == JobStatus.FAILED
    assert (job.error["code"], job.attempts) == ("PATH_NOT_ALLOWED", 1)
    assert not Clip.objects.exists()


def test_a_file_linked_out_of_the_folder_is_skipped(
    drain: Callable[..., Any], places: Places, clip_bytes: dict[str, bytes], project: Project
) -> None:
    outside = places.ingest.parent / "secret.mp4"
    outside.write_bytes(clip_bytes["sound"])
    folder = places.ingest / "alice"
    folder.mkdir()
    os.symlink(outside, folder / "leak.mp4")
    (folder / "own.mp4").write_bytes(clip_bytes["silent"])
    job = run_clipfarm(drain, project, source_url="alice", publish=False)
    assert job.status == JobStatus.COMPLETED, job.error
    assert [(r["source_url"], r["code"]) for r in job.result["rejected"]] == [
        ("alice/leak.mp4", "PATH_NOT_ALLOWED")
    ]
    assert [c.source_url for c in Clip.objects.all()] == ["alice/own.mp4"]


# --- a direct media URL --------------------------------------------------------------------


def test_a_direct_media_url_becomes_one_clip_and_publish_false_publishes_nothing(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    clip_bytes: dict[str, bytes],
    project: Project,
    folder_destination: Destination,
    private_urls: None,
) -> None:
    server.routes["/uploads/beach_day.mp4"] = ("video/mp4", clip_bytes["sound"])
    url = server.url("/uploads/beach_day.mp4")
    job = run_clipfarm(drain, project, source_url=url, publish=False, max_duration_s=1.5)

    assert job.status == JobStatus.COMPLETED, job.error
    clip = Clip.objects.get()
    assert (job.result["kind"], job.result["ingested"]) == ("url", [str(clip.pk)])
    assert (clip.source_url, clip.title, clip.status) == (url, "beach day", ClipStatus.EDITED)
    assert clip.duration_s == pytest.approx(1.5, abs=0.1)
    assert job.result["publications"] == []
    assert not Publication.objects.exists()
    assert not (places.publish / "shorts").exists()
    assert server.hits["/uploads/beach_day.mp4"] == 1

    again = run_clipfarm(drain, project, source_url=url)
    assert (again.result["ingested"], again.result["skipped"]) == ([], 1)
    assert server.hits["/uploads/beach_day.mp4"] == 1  # known: not downloaded again


def test_a_direct_url_that_is_not_media_fails_with_invalid_media_without_a_retry(
    drain: Callable[..., Any],
    places: Places,
    server: MediaServer,
    project: Project,
    private_urls: None,
) -> None:
    server.routes["/clip.mp4"] = ("application/octet-stream", b"\x00not a video at all")
    job = run_clipfarm(drain, project, source_url=server.url("/clip.mp4"))
    assert job.status == JobStatus.FAILED
    assert (job.error["code"], job.attempts) == ("INVALID_MEDIA", 1)
    assert not Clip.objects.exists()


# --- params and keywords -------------------------------------------------------------------


def test_a_creator_of_another_project_is_refused(
    drain: Callable[..., Any], places: Places, project: Project
) -> None:
    elsewhere = Project.objects.create(name="elsewhere")
    creator = Creator.objects.create(project=elsewhere, name="Bob", source_url="bob")
    job = run_clipfarm(drain, project, creator=str(creator.pk))
    assert job.status == JobStatus.FAILED
    assert job.error["code"] == "CREATOR_NOT_FOUND"


def test_a_job_without_a_source_is_refused_at_submission() -> None:
    with pytest.raises(OmnivaError) as refused:
        job_services.job_submit(pipeline="clipfarm", params={"max_clips": 3})
    assert refused.value.code == ErrorCode.VALIDATION_ERROR
    assert not Job.objects.exists()


def test_keywords_are_the_most_frequent_words_that_are_not_stopwords() -> None:
    found = keywords(
        "Kite surfing at the lake",
        "The kite pulls hard, and we're surfing; the lake's wind is strong. Kite!",
    )
    assert found[:3] == ["kite", "surfing", "lake"]
    assert not {"the", "and", "we're", "at", "is"} & set(found)
