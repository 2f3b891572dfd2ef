"""The one place that names the files of a run directory.

``molf-jax train`` writes a run directory; the plotter, ``molf-jax export`` and
``scripts/reproduce.py`` read it. Every one of them asks `RunDir` for a path, so a file is
renamed here and nowhere else.

It also keeps a run directory to its owner: `RunDir.refuse_links` (nothing written through a
symbolic link), `RunDir.refuse_foreign` (a fresh run starts in a new or empty folder) and
`RunLock` (one writer at a time).

Example:
  >>> run = RunDir("runs/molf")
  >>> run.metrics.name, run.merged.name
  ('metrics.jsonl', 'merged')
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Callable, Iterator

from molf_jax.paths import PathError, as_path, is_remote, refuse_link

__all__ = ["RunDir", "RunLock", "RunLockedError", "claimed"]


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run directory.

    Attributes:
      path: the directory itself.
      config: ``run_config.json``, the `TrainConfig` as a dict (written first).
      summary: ``summary.json``, the `RunSummary` of a finished run.
      metrics: ``metrics.jsonl``, one object per logging interval.
      routing_table: ``routing_modules.json``, module rows, expert columns, valid cells.
      routing: ``routing.jsonl``, per logged step each module's winners and scores.
      rank_table: ``rank_modules.json``, adalora: module names and the initial rank.
      ranks: ``ranks.jsonl``, adalora: per logged step each module's kept rank and the budget.
      tensorboard: ``tensorboard/``, event files when ``--tensorboard`` is on.
      checkpoints: ``checkpoints/``, orbax steps of the trainable leaves and optimizer state.
      damaged_checkpoints: ``checkpoints.damaged/``, steps that failed to restore, set aside.
      step_logs: the JSON-lines logs keyed by ``step`` (metrics, routing, ranks) that a resume cuts
        back to its checkpoint's step.
      merged: ``merged/``, the HF folder with the experts folded in.
      adapter: ``adapter/``, the PEFT adapter (lora, adalora and molfe runs with a frozen
        base).
      plots: ``plots/``, the PNGs of ``molf-jax plot``.
      lock: ``molf_jax.lock``, present while a process writes the run (`RunLock`).
      entries: everything above, the names molf_jax writes directly in the directory.
    """

    path: Path

    def __init__(self, path: str | os.PathLike):
        # A local Path, or an etils.epath.Path for object storage (gs://...).
        object.__setattr__(self, "path", as_path(path))

    config = property(lambda self: self.path / "run_config.json")
    summary = property(lambda self: self.path / "summary.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    routing_table = property(lambda self: self.path / "routing_modules.json")
    routing = property(lambda self: self.path / "routing.jsonl")
    rank_table = property(lambda self: self.path / "rank_modules.json")
    ranks = property(lambda self: self.path / "ranks.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    checkpoints = property(lambda self: self.path / "checkpoints")
    damaged_checkpoints = property(lambda self: self.path / "checkpoints.damaged")
    step_logs = property(lambda self: (self.metrics, self.routing, self.ranks))
    merged = property(lambda self: self.path / "merged")
    adapter = property(lambda self: self.path / "adapter")
    plots = property(lambda self: self.path / "plots")
    lock = property(lambda self: self.path / "molf_jax.lock")
    entries = property(lambda self: (
        self.config, self.summary, *self.step_logs, self.routing_table, self.rank_table,
        self.tensorboard, self.checkpoints, self.damaged_checkpoints, self.merged,
        self.adapter, self.plots, self.lock))

    def refuse_links(self) -> RunDir:
        """Returns self, or raises PathError naming an entry that is a symbolic link.

        Checked before a run starts, so that a planted link fails the run at once instead of
        leading a write to a file outside the directory after hours of training.
        """
        for path in self.entries:
            refuse_link(path, "run directory entry")
        return self

    def refuse_foreign(self, flag: str = "--out-dir") -> RunDir:
        """Returns self when the directory is new or empty (a fresh run may start there), else
        raises PathError: an earlier run is continued with ``--resume``, and a folder of
        someone else's files is never written into."""
        names = sorted(p.name for p in self.path.iterdir() if p != self.lock) \
            if self.path.is_dir() else []
        if not names:
            return self
        ours = {p.name for p in self.entries}
        earlier = [name for name in names if name in ours]
        shown = lambda some: ", ".join(some[:4]) + (", ..." if len(some) > 4 else "")
        if earlier:
            raise PathError(f"{flag} {self.path}: holds an earlier run ({shown(earlier)}); pass "
                            "--resume to continue it (from step 0 when it has no checkpoint), "
                            f"or choose another {flag}")
        raise PathError(f"{flag} {self.path}: holds files molf_jax did not write "
                        f"({shown(names)}); a fresh run needs a new or empty folder: choose "
                        f"another {flag}")

    def require(self) -> RunDir:
        """Returns self, or raises FileNotFoundError when no run was started here."""
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory: no {self.config.name}")
        return self

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


class RunLockedError(PathError):
    """Another process writes this run directory (the message names it)."""


class RunLock:
    """One writer per run directory: ``train`` (fresh or ``--resume``) and ``export`` hold it.

    The lock is an exclusive ``flock`` on ``RUN/molf_jax.lock``, which records the holder's
    command, host and process id for the refusal message. The kernel drops the lock of a
    process that dies however it dies, so the file a killed run leaves behind is taken over by
    the next one (and said so); no process id is ever guessed dead.

    In object storage there is no such lock: the file itself is the lock, and one left by a
    killed run is named in the refusal, for the user to delete.

    Args:
      run_dir: the run directory (it must exist).
      command: what the holder does, for the message another writer gets (``"train"``).
      say: where to report a lock taken over (e.g. ``print``); None says nothing.

    Example:
      >>> with RunLock("runs/molf", "export"):            # doctest: +SKIP
      ...     export_artifacts(load_run("runs/molf"), "runs/molf")
    """

    def __init__(self, run_dir: str | os.PathLike | RunDir, command: str,
                 say: Callable[[str], None] | None = None):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.command, self._say, self._fd = command, say, None

    def acquire(self) -> RunLock:
        """Takes the lock, or raises RunLockedError naming the process that holds it."""
        import fcntl

        if is_remote(self.run_dir.path):
            return self._acquire_object()
        path = self.run_dir.lock
        refuse_link(path, "run directory entry")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.run_dir}: molf-jax {holder.get('command', '?')} (process "
                    f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                    f"{holder.get('since', '?')}) is writing this run directory; wait for it to "
                    "finish, or choose another folder") from None
            # The holder before us unlinks the file before it unlocks: a lock won on a file no
            # longer at ``path`` locks nothing.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        left = _holder(fd)
        if left and self._say is not None:
            self._say(f"{path}: taking over the lock left by molf-jax {left.get('command', '?')} "
                      f"(process {left.get('pid', '?')}), which stopped without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._record()).encode(), 0)
        self._fd = fd
        return self

    def _acquire_object(self) -> RunLock:
        path = self.run_dir.lock
        if path.exists():
            try:
                holder = json.loads(path.read_text())
            except ValueError:
                holder = {}
            raise RunLockedError(
                f"{self.run_dir}: {path} says molf-jax {holder.get('command', '?')} (process "
                f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                f"{holder.get('since', '?')}) is writing this run directory; object storage "
                "keeps no lock a killed process releases: delete that file if no process is "
                "using the run")
        path.write_text(json.dumps(self._record()))
        self._fd = -1
        return self

    def _record(self) -> dict:
        return {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.datetime.now().isoformat(timespec="seconds")}

    def release(self) -> None:
        if self._fd is None:
            return
        if is_remote(self.run_dir.path):
            self.run_dir.lock.unlink(missing_ok=True)
            self._fd = None
            return
        try:
            os.unlink(self.run_dir.lock)
        except FileNotFoundError:
            pass
        os.close(self._fd)  # unlocks
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {"command": "(unreadable lock file)"}
    return record if isinstance(record, dict) else {}


@contextlib.contextmanager
def claimed(run_dir: RunDir, command: str, *, fresh: bool, lock: bool = True,
            say: Callable[[str], None] | None = None) -> Iterator[RunDir]:
    """Checks a run directory before anything is written to it and holds its lock meanwhile.

    Args:
      run_dir: the directory (it exists).
      command: the holder's command, for the lock (``"train"``).
      fresh: a fresh run: the directory must also be new or empty (`RunDir.refuse_foreign`).
      lock: take `RunLock` (False on every process but the first of a multi-process run).
      say: where a lock taken over from a killed process is reported.

    Example:
      >>> with claimed(RunDir("runs/molf"), "train", fresh=True):   # doctest: +SKIP
      ...     ...
    """
    run_dir.refuse_links()
    held = RunLock(run_dir, command, say).acquire() if lock else None
    try:
        if fresh:
            run_dir.refuse_foreign()
        yield run_dir
    finally:
        if held is not None:
            held.release()
