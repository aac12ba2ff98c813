"""Where clipfarm's clips come from: a creator's source, read into entries (one per
piece of media), and the media of an entry, brought to local disk.

A source is one of
- an RSS or Atom feed (http or https): each entry with a video enclosure (or
  `media:content`) is an entry, titled by the feed entry, its summary or description
  as the transcript;
- a direct media URL (http or https): one entry, fetched once to tell it from a feed;
- a folder, or one file, named relative to OMNIVA_INGEST_ROOT: its video files, by
  name, each with `<stem>.txt` beside it as its transcript when there is one.

Remote bytes only come through omniva.outbound (the SSRF guard, OMNIVA_FETCH_MAX_BYTES,
OMNIVA_FETCH_TIMEOUT_S): the feed, and every media URL in it, which the feed's author
chose and which is checked like the first. Local names are checked to stay under the
ingest root, symlinks resolved (outbound.media_path). Failures are StageErrors with
the outbound code (URL_NOT_ALLOWED, PATH_NOT_ALLOWED, FETCH_FAILED, …); only transient
ones are retryable.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from django.conf import settings
from django.utils.html import strip_tags

from jobs.pipelines.context import StageError
from omniva import outbound

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".ts", ".mpg", ".mpeg", ".ogv"}
)
TRANSCRIPT_SUFFIX = ".txt"
TRANSCRIPT_MAX_BYTES = 200_000
TITLE_MAX_CHARS = 500
SOURCE_URL_MAX_CHARS = 2048
_FEED_TYPES = ("xml", "rss", "atom")
_MEDIA_TYPES = ("video/", "audio/", "application/octet-stream", "application/mp4")
_SUFFIX = re.compile(r"^\.[0-9a-z]{1,5}$")


class SourceKind:
    FEED = "feed"
    URL = "url"
    FOLDER = "folder"


@dataclass(frozen=True)
class Entry:
    """One piece of media of a source. `source_url` names it in its project (the media
    URL, or the file's path under the ingest root); `path` is that file's path for a
    folder's entries."""

    source_url: str
    title: str
    transcript: str = ""
    path: str | None = None


@dataclass
class Source:
    kind: str
    entries: list[Entry]
    # A direct URL's body: fetched to learn what the URL is, not fetched twice.
    body: bytes | None = None
    # Entries that cannot be ingested (no media, a refused URL): {source_url, code, message}.
    rejected: list[dict[str, str]] = field(default_factory=list)

    def reject(self, source_url: str, code: str, message: str) -> None:
        self.rejected.append({"source_url": source_url, "code": code, "message": message})


def stage_error(exc: outbound.OutboundError) -> StageError:
    return StageError(exc.code.value, exc.message, retryable=exc.transient)


def is_remote(source: str) -> bool:
    return "://" in source


def read_source(source: str) -> Source:
    """The entries of `source`, in the order the source gives them (a feed's, or file
    names for a folder)."""
    if not is_remote(source):
        return _folder(source)
    fetched = fetch(source)
    if _looks_like_media(fetched):
        return Source(
            kind=SourceKind.URL,
            entries=[Entry(source_url=source, title=title_from_name(urlsplit(source).path))],
            body=fetched.body,
        )
    return _feed(fetched, source)


def fetch(url: str) -> outbound.Fetched:
    if not url.lower().startswith(("http://", "https://")):
        raise StageError(
            outbound.OutboundCode.URL_NOT_ALLOWED.value,
            "A source URL must be http(s); a local folder is named relative to the ingest root.",
            retryable=False,
        )
    try:
        return outbound.fetch(
            url,
            max_bytes=settings.OMNIVA_FETCH_MAX_BYTES,
            timeout_s=settings.OMNIVA_FETCH_TIMEOUT_S,
        )
    except outbound.OutboundError as exc:
        raise stage_error(exc) from exc


def media_suffix(name: str) -> str:
    """A file suffix for media saved from `name` (a URL or a path), `.media` when it has
    no usable one: ffmpeg reads the container from the bytes, not the name."""
    suffix = PurePosixPath(unquote(urlsplit(name).path)).suffix.lower()
    return suffix if _SUFFIX.match(suffix) else ".media"


def title_from_name(path: str) -> str:
    stem = PurePosixPath(unquote(path)).stem
    return re.sub(r"[\s_\-.]+", " ", stem).strip()[:TITLE_MAX_CHARS]


# --- feeds -------------------------------------------------------------------------------


def _looks_like_media(fetched: outbound.Fetched) -> bool:
    content_type = (fetched.content_type or "").split(";", 1)[0].strip().lower()
    if content_type.startswith(_MEDIA_TYPES):
        return True
    if any(kind in content_type for kind in _FEED_TYPES):
        return False
    # No telling header (text/plain, none at all): a document starts with '<'.
    return fetched.body.lstrip()[:1] != b"<"


def _feed(fetched: outbound.Fetched, url: str) -> Source:
    import feedparser

    # A stream, never bytes or a str: feedparser opens those as file names or URLs.
    parsed = feedparser.parse(
        io.BytesIO(fetched.body), response_headers={"content-location": fetched.final_url}
    )
    if not parsed.get("version") and not parsed.get("entries"):
        raise StageError(
            "INVALID_SOURCE",
            f"{_shown(url)} is neither an RSS/Atom feed nor a media file.",
            retryable=False,
        )
    source = Source(kind=SourceKind.FEED, entries=[])
    for item in parsed.entries:
        title = html.unescape(str(item.get("title") or "")).strip()
        media = _entry_media(item)
        if media is None:
            source.reject(
                str(item.get("link") or title), "NO_MEDIA", "The feed entry has no video enclosure."
            )
            continue
        media_url = urljoin(fetched.final_url, media)
        if len(media_url) > SOURCE_URL_MAX_CHARS:
            source.reject(
                media_url[:200],
                "URL_TOO_LONG",
                f"The media URL is longer than {SOURCE_URL_MAX_CHARS} characters.",
            )
            continue
        source.entries.append(
            Entry(
                source_url=media_url,
                title=(title or title_from_name(urlsplit(media_url).path))[:TITLE_MAX_CHARS],
                transcript=_plain_text(_entry_text(item)),
            )
        )
    return source


def _entry_media(item: Any) -> str | None:
    for enclosure in item.get("enclosures") or []:
        kind = str(enclosure.get("type") or "").lower()
        if enclosure.get("href") and (not kind or kind.startswith(("video/", "application/"))):
            return str(enclosure["href"])
    for content in item.get("media_content") or []:
        kind = str(content.get("type") or "").lower()
        medium = str(content.get("medium") or "").lower()
        if content.get("url") and (
            medium == "video" or kind.startswith("video/") or not (kind or medium)
        ):
            return str(content["url"])
    return None


def _entry_text(item: Any) -> str:
    text = item.get("summary") or item.get("description") or ""
    if not text and item.get("content"):
        text = item["content"][0].get("value") or ""
    return str(text)


def _plain_text(markup: str) -> str:
    text = html.unescape(strip_tags(markup))
    return re.sub(r"[ \t\r\f\v]+", " ", re.sub(r"\n\s*\n+", "\n", text)).strip()


def _shown(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


# --- folders -----------------------------------------------------------------------------


def ingest_root() -> Path:
    return Path(settings.OMNIVA_INGEST_ROOT).resolve()


def _refuse(name: str, why: str) -> StageError:
    return StageError(
        outbound.OutboundCode.PATH_NOT_ALLOWED.value,
        f"{name!r} {why}; a local source is a path inside the ingest root.",
        retryable=False,
    )


def _folder(name: str) -> Source:
    relative = PurePosixPath(name)
    if "\x00" in name or relative.is_absolute() or ".." in relative.parts:
        raise _refuse(name, "is absolute or contains '..'")
    root = ingest_root()
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise _refuse(name, "leads outside the ingest root")
    if target.is_file():
        return Source(kind=SourceKind.FOLDER, entries=[_file_entry(str(relative))])
    if not target.is_dir():
        raise StageError(
            "SOURCE_NOT_FOUND", f"Nothing at {name!r} in the ingest root.", retryable=False
        )
    source = Source(kind=SourceKind.FOLDER, entries=[])
    for child in sorted(target.iterdir(), key=lambda path: path.name):
        if child.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        child_name = str(relative / child.name) if str(relative) != "." else child.name
        try:
            local_file(child_name)
        except StageError as exc:  # a link out of the root, a folder named like a video
            source.reject(child_name, exc.code, exc.message)
            continue
        source.entries.append(_file_entry(child_name))
    return source


def _file_entry(name: str) -> Entry:
    local_file(name)
    transcript = ""
    sidecar = str(PurePosixPath(name).with_suffix(TRANSCRIPT_SUFFIX))
    try:
        path = outbound.media_path(sidecar, root=ingest_root())
    except outbound.OutboundError:
        path = None
    if path is not None:
        with path.open("rb") as text:
            transcript = text.read(TRANSCRIPT_MAX_BYTES).decode("utf-8", errors="replace").strip()
    return Entry(source_url=name, title=title_from_name(name), transcript=transcript, path=name)


def local_file(name: str) -> Path:
    """The file `name` under the ingest root, checked (PATH_NOT_ALLOWED, FILE_NOT_FOUND)."""
    try:
        return outbound.media_path(name, root=ingest_root())
    except outbound.OutboundError as exc:
        raise stage_error(exc) from exc
