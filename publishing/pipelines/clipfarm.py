"""The `clipfarm` pipeline (seed 002): a creator's source → new clips → published shorts.

    ingest → embed (gpu) → analyze → edit → publish

- `ingest` reads the source (the creator's `source_url`, or `params.source_url`): an
  RSS/Atom feed, a direct media URL, or a folder under OMNIVA_INGEST_ROOT
  (jobs/pipelines/lib/ingest.py). Each entry not ingested before in the job's project is fetched
  into the job's files, probed (not a video: rejected, or for a direct URL the job
  fails INVALID_MEDIA) and made a clip, up to `max_clips` new ones. A clip remembers
  which job made it and where its media is (`analysis.ingest`), so a retried ingest
  picks up the clips its earlier attempt made instead of skipping them.
- `embed` embeds each new clip's title and transcript on the gpu queue, batched across
  jobs (jobs/pipelines/gpu.py `clips_embed`). clip_ingest queues a `clip_embed` job per clip as
  well: whichever of the two runs second finds the vector made and skips the model.
- `analyze`: near-duplicates (cosine similarity of the embeddings of at least
  DUPLICATE_SIMILARITY to an earlier clip of the project), keywords, into
  `clip.analysis`; status `analyzed`. A duplicate is marked and goes no further.
- `edit` (jobs/pipelines/lib/video.py): the first `max_duration_s` seconds, fitted into 1080x1920,
  H.264/AAC MP4 and a JPEG thumbnail, stored as `clips/<clip id>/…` artifacts; the
  clip's `media_url` is the video's lasting address; status `edited`. A clip that
  cannot be edited (its source gone or unreadable) is marked `failed`; the rest go on.
- `publish` (unless `publish` is false): every active destination of the project
  (publishing/pipelines/publish.py); status `published`. A failing destination fails the
  stage with UPLOAD_FAILED after the others were tried; the retry (with backoff)
  sends only what is missing.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from django.utils import timezone

from jobs.models import Job
from jobs.pipelines.context import StageContext, StageError
from jobs.pipelines.gpu import ClipEmbedding, clips_embed
from jobs.pipelines.lib import ingest as sources
from jobs.pipelines.lib import video
from jobs.pipelines.registry import Dag, Pipeline, Stage, register
from jobs.services import job_files
from omniva import outbound
from omniva.media import artifact_local, artifact_save, job_artifact_name, media_reference
from omniva.models import Clip, ClipStatus, Creator, Project
from omniva.services import clip_ingest, clip_update, sha256_hex
from publishing.models import Destination
from publishing.pipelines.publish import PublishingOutcome, clip_publish_everywhere

DEFAULT_MAX_CLIPS = 10
MAX_CLIPS_LIMIT = 100
DEFAULT_MAX_DURATION_S = 60.0
MAX_DURATION_LIMIT_S = 600.0
# Cosine similarity of title+transcript embeddings from which a clip is a near-duplicate
# of an earlier one (all-MiniLM-L6-v2 gives about 0.6-0.8 to texts on one topic).
DUPLICATE_SIMILARITY = 0.95
KEYWORDS_MAX = 8
# How many rejected entries a job's output lists (a large feed of text posts has many).
REJECTED_SHOWN_MAX = 50

_STOPWORDS_TEXT = """a about above after again against all also am an and any are aren't as at be
    because been before being below between both but by can can't cannot could
    couldn't did didn't do does doesn't doing don't down during each even every few
    for from further get gets getting got had hadn't has hasn't have haven't having he
    he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if
    in into is isn't it it's its itself just let's like made make many may me might
    more most much must mustn't my myself no nor not now of off oh ok okay on once one
    only or other ought our ours ourselves out over own really same say says shan't
    she she's should shouldn't so some such than that that's the their theirs them
    themselves then there there's these they they'd they'll they're they've this those
    through to too under until up upon us very was wasn't we we'd we'll we're we've
    were weren't what what's when when's where where's which while who who's whom why
    why's will with won't would wouldn't yeah yes yet you you'd you'll you're you've
    your yours yourself yourselves"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
_APOSTROPHE = "\u2019"  # typographic, as in feeds' text
_WORD = re.compile(rf"[^\W\d_][\w'{_APOSTROPHE}-]*")


# --- ingest ------------------------------------------------------------------------------


def _as_uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _project_and_creator(ctx: StageContext) -> tuple[Project, Creator | None]:
    """The job's project (or, for a job without one, its creator's); a creator must
    belong to the job's project and be active."""
    job = Job.objects.select_related("project").get(pk=ctx.job_id)
    creator = None
    if ctx.params.get("creator"):
        creator_id = _as_uuid(ctx.params["creator"])
        creator = (
            Creator.objects.select_related("project").filter(pk=creator_id).first()
            if creator_id
            else None
        )
        if creator is None or (job.project_id and creator.project_id != job.project_id):
            raise StageError(
                "CREATOR_NOT_FOUND", "No such creator in the job's project.", retryable=False
            )
        if not creator.active:
            raise StageError("CREATOR_INACTIVE", f"{creator} is not active.", retryable=False)
    project = job.project or (creator.project if creator else None)
    if project is None:
        raise StageError(
            "PROJECT_REQUIRED",
            "A clipfarm job needs a project: submit it with one, or name a creator.",
            retryable=False,
        )
    return project, creator


def _stage_media(
    ctx: StageContext, entry: sources.Entry, source: sources.Source
) -> tuple[dict[str, str], Path]:
    """Where the entry's media is kept for the later stages, and a local path to it now:
    a folder's file stays where it is; remote media is fetched into the job's files."""
    if entry.path is not None:
        return {"path": entry.path}, sources.local_file(entry.path)
    body = source.body if source.body is not None else sources.fetch(entry.source_url).body
    filename = f"source-{sha256_hex(entry.source_url)[:16]}{sources.media_suffix(entry.source_url)}"
    folder = job_files(ctx.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / filename
    local.write_bytes(body)
    return {"artifact": job_artifact_name(ctx.job_id, filename)}, local


def _ingested_before(project: Project, source_urls: list[str]) -> dict[str, tuple[str, str]]:
    """source_url → (clip id, the job that made it) of the project's clips among them."""
    rows = Clip.objects.filter(project=project, source_url__in=source_urls).values_list(
        "source_url", "pk", "analysis__ingest__job"
    )
    return {url: (str(pk), str(job or "")) for url, pk, job in rows}


def ingest(ctx: StageContext) -> dict[str, Any]:
    project, creator = _project_and_creator(ctx)
    source_url = str(ctx.params.get("source_url") or (creator.source_url if creator else ""))
    if not source_url.strip():
        raise StageError("NO_SOURCE", f"{creator} has no source_url.", retryable=False)
    max_clips = int(ctx.params.get("max_clips", DEFAULT_MAX_CLIPS))
    summary: dict[str, Any] = {
        "project": str(project.pk),
        "creator": str(creator.pk) if creator else None,
        "source": source_url,
        "ingested": [],
        "skipped": 0,
        "rejected": [],
    }
    ingested: list[str] = summary["ingested"]
    # A media URL ingested before is not fetched again to learn that it is one.
    known = _ingested_before(project, [source_url])
    if sources.is_remote(source_url) and source_url in known:
        clip_id, made_by = known[source_url]
        if made_by == ctx.job_id:
            ingested.append(clip_id)
        else:
            summary["skipped"] = 1
        return {**summary, "kind": sources.SourceKind.URL}
    source = sources.read_source(source_url)
    summary["kind"] = source.kind
    rejected: list[dict[str, str]] = list(source.rejected)
    known = _ingested_before(project, [entry.source_url for entry in source.entries])
    seen: set[str] = set()
    for position, entry in enumerate(source.entries):
        if len(ingested) >= max_clips:
            break
        if entry.source_url in seen:  # a feed that lists one video twice
            continue
        seen.add(entry.source_url)
        if entry.source_url in known:
            clip_id, made_by = known[entry.source_url]
            if made_by == ctx.job_id:  # made by this job's earlier attempt
                ingested.append(clip_id)
            else:
                summary["skipped"] += 1
            continue
        try:
            where, local = _stage_media(ctx, entry, source)
            try:
                info = video.probe(local)
            except StageError:
                if "artifact" in where:
                    local.unlink(missing_ok=True)
                raise
        except StageError as exc:
            # One entry of a feed or folder that cannot be used does not stop the others;
            # a direct URL is the one entry there is.
            if exc.retryable or source.kind == sources.SourceKind.URL:
                raise
            rejected.append(
                {"source_url": entry.source_url, "code": exc.code, "message": exc.message}
            )
            ctx.log(f"skipped {entry.source_url}: {exc.code}: {exc.message}", level="warning")
            continue
        if "artifact" in where:
            artifact_save(where["artifact"], local)
        clip, created = clip_ingest(
            project=project,
            source_url=entry.source_url,
            creator=creator,
            title=entry.title,
            transcript=entry.transcript,
            duration_s=info.duration_s,
            analysis={
                "ingest": {"job": ctx.job_id, "kind": source.kind, "media": where},
                "media": info.as_dict(),
            },
        )
        if created:
            ingested.append(str(clip.pk))
        else:  # another job made it a moment ago
            summary["skipped"] += 1
        ctx.progress(100 * (position + 1) / len(source.entries))
    summary["rejected"] = rejected[:REJECTED_SHOWN_MAX]
    summary["rejected_count"] = len(rejected)
    ctx.log(
        f"{source.kind} {source_url}: {len(ingested)} new clips, {summary['skipped']} "
        f"ingested before, {len(rejected)} rejected"
    )
    return summary


# --- embed (gpu) ---------------------------------------------------------------------------


def embed_many(contexts: list[StageContext]) -> list[Any]:
    """The new clips of every job in the batch, in one forward pass."""
    wanted = [
        [str(i) for i in (ctx.inputs.get("ingest") or {}).get("ingested") or []] for ctx in contexts
    ]
    outcomes = clips_embed([clip_id for ids in wanted for clip_id in ids])
    return [
        {
            "embedded": [i for i in ids if outcomes[i] == ClipEmbedding.STORED],
            "current": [i for i in ids if outcomes[i] == ClipEmbedding.CURRENT],
            "not_embedded": [
                i for i in ids if outcomes[i] not in (ClipEmbedding.STORED, ClipEmbedding.CURRENT)
            ],
        }
        for ids in wanted
    ]


# --- analyze -------------------------------------------------------------------------------


def keywords(title: str, transcript: str, *, limit: int = KEYWORDS_MAX) -> list[str]:
    """The most frequent words of the title (counted twice) and transcript that are not
    stopwords, ties in order of first use."""
    counts: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for weight, text in ((2, title), (1, transcript)):
        for match in _WORD.finditer(text.lower()):
            word = match.group().replace(_APOSTROPHE, "'").strip("'-")
            word = word.removesuffix("'s")
            if len(word) < 3 or word in STOPWORDS:
                continue
            counts[word] += weight
            first_seen.setdefault(word, len(first_seen))
    ranked = sorted(counts, key=lambda word: (-counts[word], first_seen[word]))
    return ranked[:limit]


def nearest_earlier_clip(clip: Clip) -> tuple[Clip, float] | None:
    """The project's clip made before `clip` whose embedding is closest to its own, with
    their cosine similarity, when that is at least DUPLICATE_SIMILARITY."""
    from pgvector.django import CosineDistance

    if clip.embedding is None:
        return None
    match = (
        Clip.objects.filter(
            project=clip.project_id, embedding__isnull=False, created_at__lt=clip.created_at
        )
        .exclude(pk=clip.pk)
        .annotate(distance=CosineDistance("embedding", clip.embedding))
        .filter(distance__lte=1.0 - DUPLICATE_SIMILARITY)
        .order_by("distance", "created_at")
        .first()
    )
    return None if match is None else (match, round(1.0 - match.distance, 4))


def analyze(ctx: StageContext) -> dict[str, Any]:
    ids = (ctx.inputs.get("ingest") or {}).get("ingested") or []
    analyzed: list[str] = []
    duplicates: list[dict[str, Any]] = []
    clips = list(Clip.objects.filter(pk__in=ids).order_by("created_at"))
    for position, clip in enumerate(clips):
        nearest = nearest_earlier_clip(clip)
        findings: dict[str, Any] = {
            "keywords": keywords(clip.title, clip.transcript),
            "duplicate_of": str(nearest[0].pk) if nearest else None,
            "similarity": nearest[1] if nearest else None,
            "analyzed_at": timezone.now().isoformat().replace("+00:00", "Z"),
        }
        clip_update(
            clip=clip,
            changes={"analysis": {**clip.analysis, **findings}, "status": ClipStatus.ANALYZED},
        )
        analyzed.append(str(clip.pk))
        if nearest:
            duplicate = {"clip_id": str(clip.pk), "duplicate_of": str(nearest[0].pk)}
            duplicates.append({**duplicate, "similarity": nearest[1]})
            ctx.log(f"clip {clip.pk} is a near-duplicate of {nearest[0].pk} ({nearest[1]})")
        ctx.progress(100 * (position + 1) / len(clips))
    return {"analyzed": analyzed, "duplicates": duplicates}


# --- edit ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _source_file(clip: Clip) -> Iterator[Path]:
    """A local path to the media the clip was ingested from."""
    where = (clip.analysis.get("ingest") or {}).get("media") or {}
    if where.get("path"):
        yield sources.local_file(str(where["path"]))
        return
    if not where.get("artifact"):
        raise StageError("SOURCE_MISSING", f"Clip {clip.pk} has no source media.", retryable=False)
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(artifact_local(str(where["artifact"])))
        except (outbound.OutboundError, OSError) as exc:
            raise StageError(
                "SOURCE_MISSING", f"The source media of clip {clip.pk} is gone.", retryable=False
            ) from exc
        yield path


def _edited_entry(clip: Clip) -> dict[str, Any]:
    return {
        "clip_id": str(clip.pk),
        "media_url": clip.media_url,
        "thumbnail_url": clip.analysis.get("thumbnail"),
        "duration_s": clip.duration_s,
    }


def edit(ctx: StageContext) -> dict[str, Any]:
    found = ctx.inputs.get("analyze") or {}
    duplicates = {item["clip_id"] for item in found.get("duplicates") or []}
    ids = [clip_id for clip_id in found.get("analyzed") or [] if clip_id not in duplicates]
    max_duration_s = float(ctx.params.get("max_duration_s", DEFAULT_MAX_DURATION_S))
    scratch = job_files(ctx.job_id) / "edit"
    edited: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    clips = list(Clip.objects.filter(pk__in=ids).order_by("created_at"))
    for position, clip in enumerate(clips):
        done_before = clip.analysis.get("edit") or {}
        if done_before.get("job") == ctx.job_id and clip.media_url:
            edited.append(_edited_entry(clip))  # an earlier attempt of this stage did it
            continue
        try:
            clip = _edit_clip(clip, scratch, job_id=ctx.job_id, max_duration_s=max_duration_s)
        except StageError as exc:
            if exc.retryable:
                raise
            # One clip that cannot be edited (its source gone or broken) fails alone.
            error = {"code": exc.code, "message": exc.message}
            analysis = {**clip.analysis, "error": error}
            clip_update(clip=clip, changes={"status": ClipStatus.FAILED, "analysis": analysis})
            failed.append({"clip_id": str(clip.pk), **error})
            ctx.log(f"clip {clip.pk} was not edited: {exc.code}: {exc.message}", level="warning")
            continue
        edited.append(_edited_entry(clip))
        ctx.progress(100 * (position + 1) / len(clips), f"edited clip {clip.pk}")
    return {"edited": edited, "failed": failed}


def _edit_clip(clip: Clip, scratch: Path, *, job_id: str, max_duration_s: float) -> Clip:
    output = scratch / f"{clip.pk}.mp4"
    picture = scratch / f"{clip.pk}.jpg"
    try:
        with _source_file(clip) as source:
            info = video.edit(source, output, max_duration_s=max_duration_s)
        video.thumbnail(output, picture)
        video_name = artifact_save(f"clips/{clip.pk}/clip.mp4", output)
        picture_name = artifact_save(f"clips/{clip.pk}/thumbnail.jpg", picture)
    finally:
        output.unlink(missing_ok=True)
        picture.unlink(missing_ok=True)
    return clip_update(
        clip=clip,
        changes={
            "media_url": media_reference(video_name),
            "duration_s": info.duration_s,
            "status": ClipStatus.EDITED,
            "analysis": {
                **clip.analysis,
                "thumbnail": media_reference(picture_name),
                "edit": {"job": job_id, "max_duration_s": max_duration_s, **info.as_dict()},
            },
        },
    )


# --- publish -------------------------------------------------------------------------------


def publish(ctx: StageContext) -> dict[str, Any]:
    if not ctx.params.get("publish", True):
        return {"publish": False, "publications": []}
    ids = [item["clip_id"] for item in (ctx.inputs.get("edit") or {}).get("edited") or []]
    outcome = PublishingOutcome()
    for clip in Clip.objects.filter(pk__in=ids).order_by("created_at"):
        destinations = Destination.objects.filter(project=clip.project_id, active=True)
        made_before = len(outcome.publications)
        everywhere = clip_publish_everywhere(
            clip=clip, destinations=destinations, log=ctx.log, outcome=outcome
        )
        made = len(outcome.publications) > made_before
        if made and everywhere and clip.status != ClipStatus.PUBLISHED:
            clip_update(clip=clip, changes={"status": ClipStatus.PUBLISHED})
    outcome.raise_if_failed()
    return {"publish": True, "publications": outcome.publications}


# --- the pipeline --------------------------------------------------------------------------


def clipfarm_result(outputs: dict[str, Any], dag: Dag) -> dict[str, Any]:
    ingested = outputs.get("ingest") or {}
    analyzed = outputs.get("analyze") or {}
    return {
        "project": ingested.get("project"),
        "creator": ingested.get("creator"),
        "source": ingested.get("source"),
        "kind": ingested.get("kind"),
        "ingested": ingested.get("ingested", []),
        "skipped": ingested.get("skipped", 0),
        "rejected": ingested.get("rejected", []),
        "analyzed": analyzed.get("analyzed", []),
        "duplicates": analyzed.get("duplicates", []),
        "edited": (outputs.get("edit") or {}).get("edited", []),
        "failed": (outputs.get("edit") or {}).get("failed", []),
        "publications": (outputs.get("publish") or {}).get("publications", []),
    }


CLIPFARM = register(
    Pipeline(
        name="clipfarm",
        description="Ingest a creator's feed, folder or media URL into clips, embed and "
        "analyze them (near-duplicates, keywords), edit them into 1080x1920 H.264/AAC "
        "shorts with thumbnails, and publish them to the project's destinations.",
        stages=(
            Stage("ingest", ingest),
            Stage("embed", depends_on=("ingest",), queue="gpu", batch=embed_many),
            Stage("analyze", analyze, depends_on=("ingest", "embed")),
            Stage("edit", edit, depends_on=("analyze",)),
            Stage("publish", publish, depends_on=("edit",)),
        ),
        result=clipfarm_result,
        params_schema={
            "type": "object",
            "properties": {
                "creator": {"type": "string", "format": "uuid"},
                "source_url": {"type": "string", "minLength": 1, "maxLength": 2048},
                "max_clips": {"type": "integer", "minimum": 1, "maximum": MAX_CLIPS_LIMIT},
                "max_duration_s": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": MAX_DURATION_LIMIT_S,
                },
                "publish": {"type": "boolean"},
            },
            "anyOf": [{"required": ["creator"]}, {"required": ["source_url"]}],
            "additionalProperties": False,
        },
    )
)
