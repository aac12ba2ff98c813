"""`directory`: the item's JSON and file, written atomically under OMNIVA_PUBLISH_ROOT."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from django.conf import settings

from publishing.adapters.core import AdapterError, Item, Published, _local_file
from publishing.models import Destination


def publish_root() -> Path:
    return Path(settings.OMNIVA_PUBLISH_ROOT)


def _directory(destination: Destination, item: Item, key: str) -> Published:
    relative = PurePosixPath(str(destination.config.get("path") or "."))
    if relative.is_absolute() or ".." in relative.parts:
        raise AdapterError(
            "A directory destination's `path` must stay under the publish root.", transient=False
        )
    folder = publish_root() / relative
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _local_file(item) as path:
            if path is not None:
                _write_atomically(folder / f"{key}{item.suffix}", path)
        # The description last: its presence says the item is complete.
        _write_atomically(folder / f"{key}.json", json.dumps(item.data, sort_keys=True).encode())
    except OSError as exc:  # a full disk, a permission: the retry may succeed
        raise AdapterError(f"Writing to {relative} failed: {exc.strerror or exc}") from exc
    return Published(external_id=key, url=str(relative / f"{key}.json"))


def _write_atomically(path: Path, content: bytes | Path) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as temporary:
        if isinstance(content, Path):
            with content.open("rb") as source:
                shutil.copyfileobj(source, temporary)
        else:
            temporary.write(content)
    os.replace(temporary.name, path)
