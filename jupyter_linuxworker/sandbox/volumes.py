"""Check volume sources against the folders that jobs may mount from."""

from __future__ import annotations

import os
from typing import Any

from .spec import SpecError, Volume


def is_beneath(path: str, root: str) -> bool:
    """Return whether ``path`` is ``root`` or lies below it (both already resolved)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_volume(volume: Volume, roots: list[str]) -> dict[str, Any]:
    """Return the launch form of ``volume``, its source resolved; raise SpecError outside ``roots``.

    The source is resolved with every symlink followed, so a source that is, or passes through,
    a link that leads out of the roots is rejected.
    """
    real_roots = [os.path.realpath(root) for root in roots]
    if not real_roots:
        raise SpecError(
            "volumes", str(volume), "volumes are disabled: no volume roots are configured"
        )
    if not os.path.exists(volume.source):
        raise SpecError("volumes", str(volume), f"the source {volume.source} does not exist")
    real = os.path.realpath(volume.source)
    if not os.path.isdir(real):
        raise SpecError(
            "volumes", str(volume), f"the source {volume.source} is not a folder; mount its folder"
        )
    if not any(is_beneath(real, root) for root in real_roots):
        shown = real if real != os.path.normpath(volume.source) else volume.source
        raise SpecError(
            "volumes",
            str(volume),
            f"the source {shown} lies outside the allowed volume roots ({', '.join(real_roots)})",
        )
    status = os.stat(real)
    return {
        "source": real,
        "dest": volume.dest,
        "read_only": volume.read_only,
        "roots": real_roots,
        "owner_uid": status.st_uid,
        "owner_gid": status.st_gid,
    }
