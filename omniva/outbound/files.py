"""The outbound guard for file names: a name under MEDIA_ROOT, never out of it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from django.conf import settings

from omniva.outbound.errors import OutboundCode, OutboundError


def media_path(name: str, *, root: Path | None = None) -> Path:
    """The existing regular file `name` (relative, '/'-separated) under MEDIA_ROOT or
    `root`, with symlinks resolved.

    Raises OutboundError PATH_NOT_ALLOWED for absolute names, '..' components, NUL
    bytes and symlinks that lead out of the root, FILE_NOT_FOUND when nothing (or no
    regular file) is there. The check is on the path as it is now: whoever can write
    under the root can swap a component afterwards, so only the server should.
    """

    def refuse(why: str) -> OutboundError:
        return OutboundError(OutboundCode.PATH_NOT_ALLOWED, f"file name {name!r} {why}")

    if not isinstance(name, str) or not name:
        raise refuse("is empty")
    if "\x00" in name:
        raise refuse("contains a NUL byte")
    relative = PurePosixPath(name)
    if relative.is_absolute():
        raise refuse("is absolute")
    # Refused even where it would stay inside (a/../b): no caller needs it, and it
    # would walk through directories that may be symlinks.
    if ".." in relative.parts:
        raise refuse("contains '..'")
    base = Path(settings.MEDIA_ROOT if root is None else root).resolve()
    try:
        resolved = (base / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise refuse("cannot be resolved") from exc
    if not resolved.is_relative_to(base):
        raise refuse("leads outside the media root")
    if not resolved.is_file():
        raise OutboundError(OutboundCode.FILE_NOT_FOUND, f"file {name!r} does not exist")
    return resolved
