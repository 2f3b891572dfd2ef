"""Writing model folders safely: never over a model molf_jax did not write, never half-written.

Every folder molf_jax exports (merged HF folder, PEFT adapter) is written into a temporary
sibling, marked with ``EXPORT_MARKER`` and renamed into place, so a failure while writing leaves
the destination as it was, and a reader never sees a half-written folder. A destination that holds files but no
marker belongs to someone else (a downloaded model, a run's base model, the embedded model's
cache) and is refused unless the caller says ``overwrite=True``; a model that a run depends on
(its base model, the embedded model's cache, a run directory) is refused always.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from molf_jax.paths import PathError, owned_temp_dir, remove_abandoned_temp_dirs

__all__ = ["EXPORT_MARKER", "FolderError", "check_destination", "written_whole"]

# Written last into every folder molf_jax exports; its presence lets a later export replace it.
EXPORT_MARKER = "molf_jax_export.json"
# Files that mark folders nothing may be written over (the embedded model's cache, a run).
_NEVER_OVER = {"molf_jax_conversion.json": "the embedded model's cache",
               "run_config.json": "a training run's directory"}


class FolderError(PathError):
    """A destination folder that must not be written (the message says why and what to do)."""


def check_destination(out_dir: str | os.PathLike, *, overwrite: bool = False,
                      protected: Iterable[str | os.PathLike | None] = (),
                      flag: str = "output folder") -> Path:
    """Checks that a model folder may be written at ``out_dir``; returns it as a Path.

    Args:
      out_dir: the destination.
      overwrite: allow replacing a folder that holds files molf_jax did not write.
      protected: folders never to write over whatever ``overwrite`` says (e.g. the run's base
        model); None entries are ignored.
      flag: how the message names the destination (e.g. ``"--merged"``).

    Raises:
      FolderError: ``out_dir`` is a file, a protected folder, the embedded model's cache, a run
        directory, or (without ``overwrite``) a non-empty folder without ``EXPORT_MARKER``.

    Example:
      >>> check_destination("runs/molf/merged", protected=["/models/gemma-3-1b"])  # doctest: +SKIP
      PosixPath('runs/molf/merged')
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise FolderError(f"{flag} {out_dir}: is a symbolic link (to {os.readlink(out_dir)}); "
                          "an export is written in place, never through a link: remove the "
                          "link or choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise FolderError(f"{flag} {out_dir}: exists and is not a folder")
    for folder in protected:
        if folder is not None and out_dir.exists() and Path(folder).exists() and \
                out_dir.resolve() == Path(folder).resolve():
            raise FolderError(f"{flag} {out_dir}: that is the run's base model; writing there "
                              "would replace it (even with --overwrite); choose another folder")
    if not out_dir.is_dir():
        return out_dir
    for marker, what in _NEVER_OVER.items():
        if (out_dir / marker).is_file():
            raise FolderError(f"{flag} {out_dir}: that is {what}; writing there would break "
                              "it (even with --overwrite); choose another folder")
    names = sorted(p.name for p in out_dir.iterdir())
    if names and EXPORT_MARKER not in names and not overwrite:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise FolderError(f"{flag} {out_dir}: holds files molf_jax did not write ({shown}); "
                          "choose another folder, or pass --overwrite to replace it")
    return out_dir


@contextlib.contextmanager
def written_whole(out_dir: str | os.PathLike, *, overwrite: bool = False,
                  protected: Iterable[str | os.PathLike | None] = (),
                  flag: str = "output folder", record: dict | None = None) -> Iterator[Path]:
    """Yields a temporary folder to write into; on success renames it to ``out_dir``.

    ``out_dir`` is checked first (`check_destination`). The folder is marked with
    ``EXPORT_MARKER`` (holding ``record``) before the rename; a previous folder at ``out_dir``
    is replaced only after the new one is complete. On an error the temporary folder goes and
    ``out_dir`` is left as it was.

    Example:
      >>> with written_whole("runs/molf/merged") as folder:               # doctest: +SKIP
      ...     save_file(tensors, folder / "model.safetensors")
    """
    out_dir = check_destination(out_dir, overwrite=overwrite, protected=protected, flag=flag)
    parent = out_dir.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        # What an export killed half way left (its process is gone) goes first.
        remove_abandoned_temp_dirs(parent, out_dir.name)
        temp = owned_temp_dir(parent, out_dir.name)
    except OSError as err:
        raise FolderError(f"{flag} {out_dir}: cannot write in {parent} "
                          f"({err.strerror or err})") from err
    try:
        yield temp
        (temp / EXPORT_MARKER).write_text(json.dumps(record or {}), encoding="utf-8")
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(temp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
