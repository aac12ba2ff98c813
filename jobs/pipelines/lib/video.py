"""Video work with the ffmpeg binary that the imageio-ffmpeg wheel carries: probe a file,
edit it into a vertical short (1080x1920 H.264/AAC MP4), take a JPEG thumbnail.

The binary runs as a subprocess with a time limit, no stdin and its stderr captured.
Inputs are files on local disk only, opened with the file protocol alone and through
an allow-list of container demuxers: a playlist (HLS, concat) that could make ffmpeg
open URLs or other files by itself is refused like any file that is not media. A file
ffmpeg cannot read as a video fails with INVALID_MEDIA (not retried); ffmpeg running
out of time is transient.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jobs.pipelines.context import StageError

OUTPUT_WIDTH = 1080
OUTPUT_HEIGHT = 1920
THUMBNAIL_WIDTH = 540
THUMBNAIL_HEIGHT = 960
# x264's speed/size trade-off; callers that need speed over size (tests) pass their own.
DEFAULT_PRESET = "veryfast"
PROBE_TIMEOUT_S = 30.0
EDIT_TIMEOUT_S = 900.0
THUMBNAIL_TIMEOUT_S = 60.0
# Demuxers a source may be read with (containers of audio/video streams only); `mov`'s
# and `matroska`'s names in ffmpeg are the comma lists themselves.
INPUT_FORMATS = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,flv,mpegts,mpeg,ogg"
_ERROR_TAIL_CHARS = 500

_DURATION = re.compile(r"^\s*Duration:\s*(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", re.MULTILINE)
_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*?: (Video|Audio): ([0-9A-Za-z_]+)(.*)$", re.MULTILINE)
_SIZE = re.compile(r"\b([1-9]\d{0,4})x([1-9]\d{0,4})\b")  # not a tag such as 0x0021
# The first field after the codec's own description: `yuv420p(progressive)`, `yuv420p`.
_PIXEL_FORMAT = re.compile(r"^[^,]*,\s*([0-9a-z_]+)")
_CONTEXT = re.compile(r"^\[[^\]]* @ 0x[0-9a-f]+\]\s*")
_ROTATION = re.compile(r"rotation of (-?\d+(?:\.\d+)?) degrees")


@dataclass(frozen=True)
class MediaInfo:
    """What ffmpeg reads from a file: duration, the first video stream's displayed size
    and codec, the first audio stream's codec (None when there is none)."""

    duration_s: float | None
    width: int
    height: int
    video_codec: str
    pixel_format: str | None
    audio_codec: str | None
    bytes: int

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _reason(stderr: str, *paths: Path) -> str:
    """ffmpeg's last words, without its context prefixes and without our folders."""
    lines = [_CONTEXT.sub("", line).strip() for line in stderr.splitlines()]
    reason = next((line for line in reversed(lines) if line), "no message")
    for path in paths:
        reason = reason.replace(f"file:{path.resolve()}", path.name)
        reason = reason.replace(str(path.resolve()), path.name).replace(str(path), path.name)
    return reason[-_ERROR_TAIL_CHARS:]


def _run(args: list[str], *, timeout_s: float, what: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [ffmpeg_exe(), "-nostdin", "-hide_banner", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StageError(
            "FFMPEG_TIMEOUT", f"ffmpeg did not finish the {what} in {timeout_s:.0f} s."
        ) from exc


def _input_args(path: Path) -> list[str]:
    # An absolute path: a relative name such as `concat:a|b` would pick a protocol.
    return [
        "-protocol_whitelist", "file",
        "-format_whitelist", INPUT_FORMATS,
        "-i", f"file:{path.resolve()}",
    ]  # fmt: skip


def probe(path: Path) -> MediaInfo:
    """The file's streams as `ffmpeg -i` reports them; INVALID_MEDIA when it is not a
    video ffmpeg can read."""
    if not path.is_file():
        raise StageError("INVALID_MEDIA", f"{path.name} is not a file.", retryable=False)
    # `ffmpeg -i` without an output prints the input's description and exits non-zero.
    report = _run(_input_args(path), timeout_s=PROBE_TIMEOUT_S, what="probe").stderr
    if "Input #0" not in report:
        raise StageError(
            "INVALID_MEDIA",
            f"{path.name} is not a media file ffmpeg can read: {_reason(report, path)}",
            retryable=False,
        )
    video: tuple[str, str] | None = None
    audio_codec: str | None = None
    for kind, codec, rest in _STREAM.findall(report):
        if kind == "Video" and video is None and "(attached pic)" not in rest:
            video = (codec, rest)
        elif kind == "Audio" and audio_codec is None:
            audio_codec = codec
    if video is None:
        raise StageError("INVALID_MEDIA", f"{path.name} has no video stream.", retryable=False)
    size = _SIZE.search(video[1])
    if size is None:
        raise StageError(
            "INVALID_MEDIA", f"{path.name}: the video stream has no size.", retryable=False
        )
    width, height = int(size[1]), int(size[2])
    rotation = _ROTATION.search(report)
    if rotation and round(abs(float(rotation[1]))) % 180 == 90:
        width, height = height, width  # shown turned: ffmpeg rotates it when decoding
    duration = _DURATION.search(report)
    duration_s = (
        int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3]) if duration else None
    )
    pixel_format = _PIXEL_FORMAT.search(video[1])
    return MediaInfo(
        duration_s=round(duration_s, 3) if duration_s is not None else None,
        width=width,
        height=height,
        video_codec=video[0],
        pixel_format=pixel_format[1] if pixel_format else None,
        audio_codec=audio_codec,
        bytes=path.stat().st_size,
    )


def edit(
    source: Path,
    output: Path,
    *,
    max_duration_s: float,
    preset: str = DEFAULT_PRESET,
    info: MediaInfo | None = None,
) -> MediaInfo:
    """`source` cut to its first `max_duration_s` seconds, scaled to fit 1080x1920 with
    its aspect ratio kept and padded with black, as an H.264 (yuv420p) + AAC stereo MP4
    with the index up front (+faststart). A source without sound gets a silent track,
    so every output has both streams. Returns the output's probe."""
    info = info or probe(source)
    duration = (
        min(max_duration_s, info.duration_s) if info.duration_s is not None else max_duration_s
    )
    fit = (
        f"scale={OUTPUT_WIDTH}:{OUTPUT_HEIGHT}:force_original_aspect_ratio=decrease"
        ":force_divisible_by=2,"
        f"pad={OUTPUT_WIDTH}:{OUTPUT_HEIGHT}:(ow-iw)/2:(oh-ih)/2:color=black,"
        "setsar=1,format=yuv420p"
    )
    audio = ["-map", "0:a:0"]
    silence: list[str] = []
    if not info.has_audio:
        silence = ["-f", "lavfi", "-i", "anullsrc=channel_layout=stereo:sample_rate=44100"]
        audio = ["-map", "1:a:0", "-shortest"]
    output.parent.mkdir(parents=True, exist_ok=True)
    args = [
        "-y", "-loglevel", "error",
        *_input_args(source),
        *silence,
        "-map", "0:v:0", *audio,
        "-t", f"{duration:.3f}",
        "-vf", fit,
        "-c:v", "libx264", "-preset", preset, "-crf", "23", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "128k", "-ac", "2", "-ar", "44100",
        "-movflags", "+faststart",
        "-f", "mp4", str(output),
    ]  # fmt: skip
    done = _run(args, timeout_s=EDIT_TIMEOUT_S, what="edit")
    if done.returncode != 0 or not output.is_file():
        output.unlink(missing_ok=True)
        raise StageError(
            "EDIT_FAILED",
            f"ffmpeg could not edit {source.name}: {_reason(done.stderr, source, output)}",
            retryable=False,
        )
    return probe(output)


def thumbnail(video: Path, output: Path, *, at_s: float = 1.0) -> Path:
    """A JPEG of the frame at `at_s` (or the video's middle when it is shorter), scaled
    to half the edit's size."""
    info = probe(video)
    at = min(at_s, info.duration_s / 2) if info.duration_s else 0.0
    output.parent.mkdir(parents=True, exist_ok=True)
    fit = f"scale={THUMBNAIL_WIDTH}:{THUMBNAIL_HEIGHT}:force_original_aspect_ratio=decrease"
    args = [
        "-y", "-loglevel", "error",
        "-ss", f"{at:.3f}",
        *_input_args(video),
        "-frames:v", "1",
        "-vf", fit,
        "-q:v", "3", "-update", "1",
        "-f", "image2", "-c:v", "mjpeg", str(output),
    ]  # fmt: skip
    done = _run(args, timeout_s=THUMBNAIL_TIMEOUT_S, what="thumbnail")
    if done.returncode != 0 or not output.is_file() or output.stat().st_size == 0:
        output.unlink(missing_ok=True)
        raise StageError(
            "EDIT_FAILED",
            f"ffmpeg could not take a thumbnail of {video.name}: "
            f"{_reason(done.stderr, video, output)}",
            retryable=False,
        )
    return output
