"""Paths a user names: checked once, with one message that says what is wrong.

A run directory may be local or in object storage (``gs://bucket/run`` on a TPU pod, where the
hosts share no file system). Local paths are `pathlib.Path` (links, locks and atomic renames
work there); a path with a scheme is an `etils.epath.Path`, the path layer orbax itself uses.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

__all__ = ["PathError", "as_path", "is_remote", "open_appending", "owned_temp_dir",
           "process_alive", "refuse_link", "remove_abandoned_temp_dirs", "writable_file",
           "writable_folder", "write_replacing"]


class PathError(ValueError):
    """A path given by the user that cannot be used as asked (the message names it)."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names object storage (``gs://...``, ``s3://...``), not a local file."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> Path:
    """``path`` as a `pathlib.Path`, or an `etils.epath.Path` when `is_remote`.

    Example:
      >>> as_path("gs://bucket/run") / "metrics.jsonl"            # doctest: +SKIP
      PosixGPath('gs://bucket/run/metrics.jsonl')
    """
    if is_remote(path):
        from etils import epath

        return epath.Path(os.fspath(path))
    return Path(path)


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
    if not str(path).strip():  # Path("") is the current folder
        raise PathError(f"{flag} is empty; name a folder")
    if is_remote(path):
        return _writable_remote_folder(as_path(path), flag)
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


def _writable_remote_folder(path, flag: str):
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".molf_jax-probe-{socket.gethostname()}-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except Exception as err:  # each storage backend raises its own kinds
        raise PathError(f"{flag} {path}: cannot write there ({err})") from None
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


def refuse_link(path: str | os.PathLike, what: str = "") -> None:
    """Raises PathError when ``path`` is a symbolic link: a file molf_jax writes is written in
    place, never through a link to somewhere else.

    Example:
      >>> refuse_link("runs/molf/metrics.jsonl")                  # doctest: +SKIP
    """
    if is_remote(path):  # object storage has no links
        return
    path = Path(path)
    if path.is_symlink():
        raise PathError(f"{what + ' ' if what else ''}{path}: is a symbolic link (to "
                        f"{os.readlink(path)}); molf_jax writes its files in place, never "
                        "through a link: remove the link or choose another folder")


def write_replacing(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to a new file beside ``path`` and renames it over ``path``.

    The rename replaces whatever was at ``path`` (a symbolic link included) instead of following
    it, and a kill mid-write leaves the old file or the new one, whole.

    Example:
      >>> write_replacing("runs/molf/run_config.json", "{}")      # doctest: +SKIP
      PosixPath('runs/molf/run_config.json')
    """
    if is_remote(path):  # an object is replaced whole by each write
        path = as_path(path)
        path.write_text(text)
        return path
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: a fresh name, never a file or link planted there; 0o666 and the umask give the
    # permissions open() would.
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return path


def open_appending(path: str | os.PathLike):
    """``open(path, "a")`` (line-buffered text) that refuses to follow a symbolic link.

    In object storage, where an object cannot be appended to, the lines are kept and the whole
    object is written again by each ``flush()`` (and by ``close()``).
    """
    if is_remote(path):
        return _RewrittenObject(as_path(path))
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        handle = os.open(path, flags, 0o644)
    except OSError as err:
        if Path(path).is_symlink():
            refuse_link(path)
        raise
    return os.fdopen(handle, "a", buffering=1, encoding="utf-8")


def owned_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new temporary folder ``.<name>.tmp-<host>-<pid>-*`` in ``parent``.

    Host and process id in the name let `remove_abandoned_temp_dirs` tell the folder of a killed
    process from one being written now.
    """
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(name) + f"{os.getpid()}-", dir=parent))


def remove_abandoned_temp_dirs(parent: str | os.PathLike, name: str) -> list[Path]:
    """Deletes the `owned_temp_dir` folders for ``name`` in ``parent`` whose process (on this
    host) no longer runs; returns them. Folders of other hosts are left: their processes cannot
    be asked.

    Example:
      >>> remove_abandoned_temp_dirs("runs/molf", "merged")       # doctest: +SKIP
      [PosixPath('runs/molf/.merged.tmp-host-4242-x1y2')]
    """
    prefix, removed = _temp_prefix(name), []
    if os.name != "posix" or not Path(parent).is_dir():  # os.kill(pid, 0) probes on POSIX only
        return removed
    for path in Path(parent).glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if path.is_dir() and not path.is_symlink() and pid.isdigit() and \
                not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (POSIX)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-{socket.gethostname()}-"


class _RewrittenObject:
    """A text log in object storage: `open_appending`'s file for a remote path."""

    def __init__(self, path):
        self._path = path
        self._chunks = [path.read_text()] if path.exists() else []
        self._dirty = not self._chunks

    def write(self, text: str) -> int:
        self._chunks.append(text)
        self._dirty = True
        return len(text)

    def flush(self) -> None:
        if self._dirty:
            self._path.write_text("".join(self._chunks))
            self._dirty = False

    def close(self) -> None:
        self.flush()
