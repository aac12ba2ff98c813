"""jobs/pipelines/lib/video.py with the real ffmpeg binary on videos the tests make (lavfi
testsrc and sine): probing, the vertical H.264/AAC edit, thumbnails, and files that are not
media."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from PIL import Image, ImageStat

from jobs.pipelines.context import StageError
from jobs.pipelines.lib import video


def make_video(
    path: Path, *, seconds: float = 3, size: str = "320x240", audio: bool = True
) -> Path:
    """A small H.264 MP4 of ffmpeg's test pattern, with a 440 Hz tone unless `audio` is
    false."""
    args = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error",
        "-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration={seconds}",
    ]  # fmt: skip
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if audio:
        args += ["-c:a", "aac", "-shortest"]
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*args, str(path)], check=True, capture_output=True, timeout=60)
    return path


def mean_brightness(picture: Image.Image, box: tuple[int, int, int, int]) -> float:
    return sum(ImageStat.Stat(picture.crop(box).convert("L")).mean)


def test_a_probe_reads_the_duration_size_and_codecs(tmp_path: Path) -> None:
    info = video.probe(make_video(tmp_path / "in.mp4", seconds=3))
    assert (info.width, info.height) == (320, 240)
    assert (info.video_codec, info.audio_codec, info.pixel_format) == ("h264", "aac", "yuv420p")
    assert info.duration_s == pytest.approx(3.0, abs=0.05)
    assert info.bytes == (tmp_path / "in.mp4").stat().st_size
    silent = video.probe(make_video(tmp_path / "silent.mp4", seconds=2, audio=False))
    assert (silent.audio_codec, silent.has_audio) == (None, False)


def test_an_edit_is_a_1080x1920_h264_aac_mp4_trimmed_to_the_max_length(tmp_path: Path) -> None:
    source = make_video(tmp_path / "in.mp4", seconds=4)
    output = tmp_path / "out" / "clip.mp4"
    info = video.edit(source, output, max_duration_s=2, preset="ultrafast")
    assert info == video.probe(output)
    assert (info.width, info.height) == (1080, 1920)
    assert (info.video_codec, info.audio_codec, info.pixel_format) == ("h264", "aac", "yuv420p")
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    # +faststart: the index (moov) comes before the media data (mdat).
    data = output.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")


def test_a_shorter_source_keeps_its_length_and_a_silent_one_gets_an_aac_track(
    tmp_path: Path,
) -> None:
    source = make_video(tmp_path / "silent.mp4", seconds=2, audio=False)
    info = video.edit(source, tmp_path / "out.mp4", max_duration_s=30, preset="ultrafast")
    assert info.audio_codec == "aac"
    assert info.duration_s == pytest.approx(2.0, abs=0.1)


def test_the_thumbnail_is_a_jpeg_with_the_picture_fitted_between_black_bands(
    tmp_path: Path,
) -> None:
    # 4:3 into 9:16: the width fills, black bands above and below keep the aspect.
    source = make_video(tmp_path / "in.mp4", seconds=2)
    edited = tmp_path / "clip.mp4"
    video.edit(source, edited, max_duration_s=2, preset="ultrafast")
    thumbnail = video.thumbnail(edited, tmp_path / "thumb.jpg")
    picture = Image.open(thumbnail)
    assert (picture.format, picture.size) == ("JPEG", (video.THUMBNAIL_WIDTH, 960))
    band = (960 - 540 * 240 // 320) // 2  # 277 rows of padding above the picture
    assert mean_brightness(picture, (0, 0, 540, band - 10)) < 10
    assert mean_brightness(picture, (0, band + 20, 540, 960 - band - 20)) > 40


@pytest.mark.parametrize("content", [b"just some text\n", b"", b"\x00\x01" * 500])
def test_a_file_that_is_not_media_fails_with_invalid_media_and_is_not_retried(
    tmp_path: Path, content: bytes
) -> None:
    source = tmp_path / "clip.mp4"
    source.write_bytes(content)
    with pytest.raises(StageError) as probed:
        video.probe(source)
    with pytest.raises(StageError) as edited:
        video.edit(source, tmp_path / "out.mp4", max_duration_s=2, preset="ultrafast")
    for failure in (probed.value, edited.value):
        assert (failure.code, failure.retryable) == ("INVALID_MEDIA", False)
    assert str(tmp_path) not in probed.value.message  # no server paths in job errors
    assert not (tmp_path / "out.mp4").exists()


class CountingServer(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.requests = 0
        super().__init__(("127.0.0.1", 0), _CountingHandler)


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    server: CountingServer

    def do_GET(self) -> None:
        self.server.requests += 1
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[CountingServer]:
    server = CountingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_playlist_that_would_make_ffmpeg_open_urls_is_refused_unopened(
    tmp_path: Path, counting_server: CountingServer
) -> None:
    url = f"http://127.0.0.1:{counting_server.server_address[1]}/segment.ts"
    playlist = tmp_path / "clip.mp4"  # the name does not choose the demuxer
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\n{url}\n#EXT-X-ENDLIST\n")
    with pytest.raises(StageError) as failure:
        video.probe(playlist)
    assert (failure.value.code, failure.value.retryable) == ("INVALID_MEDIA", False)
    assert counting_server.requests == 0
