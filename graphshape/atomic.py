"""Atomic file writes: a temp file in the destination folder, then ``os.replace``, so an
error never leaves a half-written output and never touches an existing file early."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def default_file_mode(path: str) -> None:
    """Give a file made by ``tempfile.mkstemp`` (mode 0600) the mode a plain ``open`` would
    have given it (0666 less the umask), so that atomic writes do not change permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write(path: str, write: Callable[[str], None], *, keep_extension: bool = False) -> None:
    """Call ``write(tmp)`` on a temp file in ``path``'s folder, then rename it to ``path``;
    on any error the temp file is removed and ``path`` is untouched. ``keep_extension``
    ends the temp name with ``path``'s extension (matplotlib picks the format from it)."""
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    suffix = ".tmp" + (os.path.splitext(base)[1] if keep_extension else "")
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        default_file_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
