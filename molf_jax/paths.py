"""Paths a user names: checked once, with one message that says what is wrong."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["PathError", "writable_folder", "writable_file"]


class PathError(ValueError):
    """A path given by the user that cannot be used as asked (the message names it)."""


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """Creates ``path`` if needed and checks that files can be written in it.

    Args:
      path: the folder.
      flag: how messages name it (e.g. ``"--out-dir"``).

    Raises:
      PathError: it is a file, cannot be created, or cannot be written.

    Example:
      >>> writable_folder("runs/molf", "--out-dir")          # doctest: +SKIP
      PosixPath('runs/molf')
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A probe, not os.access: that answers yes to root on a read-only file system.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise PathError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
    return path


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Checks that ``path`` is, or can become, a file (its folder created if needed).

    Example:
      >>> writable_file("results/eval.csv", "--results")     # doctest: +SKIP
      PosixPath('results/eval.csv')
    """
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{flag} {path}: is a folder, not a file")
    writable_folder(path.parent, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise PathError(f"{flag} {path}: not writable")
    return path
