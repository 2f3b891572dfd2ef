"""Orbax checkpoints of a run: trainable params, optimizer state (routing state included) and a
JSON record of the step, data position, seed and model identity.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
while saving leaves no checkpoint that loads as complete; `latest_step` only sees finished ones.
Frozen leaves are not saved: they come back from the model source, and the identity check makes
sure it is the same model.

Each checkpoint's JSON record also holds a checksum of every saved array (`value_checksums`,
computed on the devices from the arrays' bits), and a restore recomputes them: damage that
leaves the files readable (flipped bytes of the same size) is found and handled like a
truncated file: named, set aside, the next older checkpoint tried.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from molf_jax.paths import as_path, is_remote
from molf_jax.run_dir import RunDir

__all__ = ["CheckpointSaveError", "RunCheckpointer", "ResumeError", "check_step_count",
           "value_checksums"]


class ResumeError(RuntimeError):
    """A resume that cannot continue this run (no checkpoint, or another model or mode)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint that could not be written (read-only folder, disk full); the run stops."""


class RunCheckpointer:
    """Saves and restores ``(params, opt_state, meta)`` under ``<out_dir>/checkpoints``.

    Example:
      >>> ckpt = RunCheckpointer("runs/x", keep=2)                  # doctest: +SKIP
      >>> ckpt.save(100, params, opt_state, {"data": it.state()})   # doctest: +SKIP
      >>> params, opt_state, meta = ckpt.restore(params, opt_state)  # doctest: +SKIP
    """

    def __init__(self, out_dir: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        if not isinstance(keep, int) or keep < 1:  # 0 would delete the run's only checkpoint
            raise ValueError(f"--keep-checkpoints must be at least 1, got {keep}")
        run_dir = RunDir(out_dir)
        self._saving = None  # the step of the last save started
        self._remote = is_remote(run_dir.path)  # gs://...: orbax and epath take it as it is
        absolute = str if self._remote else os.path.abspath
        self.directory = absolute(run_dir.checkpoints)
        self._damaged = absolute(run_dir.damaged_checkpoints)
        # Step folders are made in save() itself: a folder that cannot be written fails the
        # save it belongs to, in the loop's thread, instead of a background thread later.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        """Starts saving a step (it commits in the background); ``meta`` gets the arrays'
        checksums.

        Raises:
          CheckpointSaveError: this save, or the previous one still committing, failed.
        """
        meta = {**meta, "checksums": {"params": value_checksums(params),
                                      "opt_state": value_checksums(opt_state)}}
        with self._save_errors(self._saving):  # the save still committing
            self._manager.wait_until_finished()
        self._saving = step
        with self._save_errors(step):
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta)), force=True)

    @contextlib.contextmanager
    def _save_errors(self, step: int | None):
        """Orbax's failures as one CheckpointSaveError naming the folder and the fault.

        Orbax logs a failed background commit with its traceback from each of its threads;
        those records are held back here, the first fault is the one reported.
        """
        quiet = _Silenced(logging.getLogger("absl"), logging.getLogger("orbax"))
        try:
            with quiet:
                yield
        except Exception as err:  # orbax, tensorstore and the OS raise many kinds
            what = f"checkpoint step {step}" if step is not None else "the last checkpoint"
            raise CheckpointSaveError(f"{what} could not be written in {self.directory} "
                                      f"({_what_is_wrong(err)}); the run stops here: "
                                      "--resume continues from the last checkpoint that was "
                                      "written") from None

    def restore(self, params_like: Any, opt_state_like: Any, *,
                identity: dict | None = None,
                say: Callable[[str], None] | None = None) -> tuple[Any, Any, dict]:
        """Restores the newest checkpoint that restores onto the shardings of the given trees.

        A checkpoint that fails to restore (truncated or missing files) is named with what is
        wrong, moved aside to ``checkpoints.damaged/`` (so later saves of the same step do not
        clash with it) and the next older one is tried.

        Args:
          params_like, opt_state_like: trees with the target shapes, dtypes and shardings.
          identity: what the checkpoint's run must match (model, mode, ranks, shapes).
          say: where to report a damaged checkpoint and the fallback (e.g. ``print``).

        Raises:
          ResumeError: when there is no finished checkpoint, none restores, or the newest
            readable one is of another run (model, mode, LoRA ranks, parameter shapes).

        Example:
          >>> params, opt_state, meta = ckpt.restore(params, opt_state, say=print)  # doctest: +SKIP
          checkpoint runs/x/checkpoints/6 does not restore (...); trying step 3
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise ResumeError(f"--resume: no finished checkpoint in {self.directory}")
        damaged = []
        for step in steps:
            why = self._unreadable(step)
            meta = None
            if why is None:
                meta, why = self._try_restore(step, meta=ocp.args.JsonRestore())
            if why is None:
                meta = meta["meta"]
                if identity is not None:
                    _check_identity(meta, identity, self.directory)
                restored, why = self._try_restore(
                    step, params=ocp.args.StandardRestore(_abstract(params_like)),
                    opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)))
            if why is None:
                why = _checksum_mismatch(restored, meta.get("checksums"))
            if why is not None:
                damaged.append((step, why))
                self._report_damage(step, why, steps, say)
                continue
            self._set_aside([s for s, _ in damaged])
            return restored["params"], restored["opt_state"], meta
        details = "; ".join(f"step {s}: {why}" for s, why in damaged)
        raise ResumeError(f"--resume: no checkpoint in {self.directory} restores ({details})")

    def _unreadable(self, step: int) -> str | None:
        """What is wrong with a step's array stores, or None when every stored value reads back.

        Reads each item's OCDBT store value by value before orbax restores from it. A truncated
        or missing file fails here, in this thread, with tensorstore's message; in orbax's
        restore the same fault would fail one of many concurrent coroutines while the others'
        reads are still in flight, and those would print "Event loop is closed" tracebacks from
        tensorstore's threads whenever they finish. Costs one extra read of the checkpoint
        (about 10 s for 3 GB here). Runs on a single process only: on a pod every host would
        read the whole checkpoint; there the restore's own failure is the check.
        """
        if jax.process_count() != 1 or self._remote:
            return None
        folder = os.path.join(self.directory, str(step))
        for item in sorted(os.listdir(folder)):
            if os.path.exists(os.path.join(folder, item, "manifest.ocdbt")):
                try:
                    why = _first_unreadable_value(os.path.join(folder, item))
                except Exception as err:  # a store that does not open (manifest damaged)
                    why = _what_is_wrong(err)
                if why is not None:
                    return why
        return None

    def _try_restore(self, step: int, **items) -> tuple[Any, str | None]:
        """``(restored items, None)``, or ``(None, what is wrong)`` when the step is damaged.

        Orbax reads arrays in concurrent coroutines. After the first failed read the others
        are dropped un-awaited, and Python prints each one's error when it is collected
        ("Exception ignored in <coroutine ...>", "Event loop is closed"): hundreds of lines
        for one damaged file. The first error is the one reported; the echoes are collected
        here, with the hook that prints them silenced.
        """
        hook = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items)), None
        except Exception as err:  # orbax and tensorstore raise many kinds; each means damage
            return None, _what_is_wrong(err)
        finally:
            gc.collect()
            sys.unraisablehook = hook

    def _report_damage(self, step: int, why: str, steps: list[int], say) -> None:
        older = [s for s in steps if s < step]
        then = f"trying step {older[0]}" if older else "no older checkpoint is kept"
        if say is not None:
            say(f"checkpoint {os.path.join(self.directory, str(step))} does not restore "
                f"({why}); {then}")

    def _set_aside(self, steps: list[int]) -> None:
        """Moves damaged step folders to ``checkpoints.damaged/`` beside the checkpoints."""
        if not steps or jax.process_index() != 0:
            return
        damaged, directory = as_path(self._damaged), as_path(self.directory)
        damaged.mkdir(parents=True, exist_ok=True)
        for step in steps:
            (directory / str(step)).rename(damaged / f"{step}-{int(time.time())}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed.

        Raises:
          CheckpointSaveError: that save failed.
        """
        with self._save_errors(self._saving):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for a save in flight and closes; a failed save was reported by `wait`/`save`
        (or is being reported by the error that ends the run) and is not raised again."""
        with contextlib.suppress(Exception), _Silenced(logging.getLogger("absl"),
                                                       logging.getLogger("orbax")):
            self._manager.wait_until_finished()
        with contextlib.suppress(Exception):
            self._manager.close()


def check_step_count(meta: dict, total_steps: int, *, reschedule: bool = False,
                     say: Callable[[str], None] | None = None) -> None:
    """Refuses to resume a run for another number of optimizer steps than it was started for
    (its learning-rate schedule would change under it), unless ``reschedule`` asks for it.

    Raises:
      ResumeError: the step counts differ and ``reschedule`` is False, or the checkpoint is
        already past ``total_steps``.

    Example:
      >>> check_step_count({"step": 12, "total_steps": 12}, 12)
    """
    saved, step = meta.get("total_steps"), int(meta["step"])
    if saved is None or saved == total_steps:
        return
    if step > total_steps:
        raise ResumeError(f"--resume: the checkpoint is at step {step}, past the {total_steps} "
                          "optimizer steps asked for (--steps / --epochs)")
    if not reschedule:
        raise ResumeError(f"--resume: the run was started for {saved} optimizer steps, this "
                          f"command asks for {total_steps} (--steps / --epochs), which would "
                          "rebuild its learning-rate schedule mid-run; give the run's own "
                          f"step count, or add --reschedule to continue on a schedule for "
                          f"{total_steps} steps")
    if say is not None:
        say(f"--reschedule: the learning-rate schedule is rebuilt for {total_steps} steps "
            f"(the run was started for {saved}); the rate changes at step {step}")


def value_checksums(tree: Any) -> dict[str, str]:
    """A checksum of each array's bits, keyed by its path in ``tree`` (hex strings).

    The sum of the array's bit patterns (as unsigned 32-bit words) each times an odd weight
    that depends on its position, modulo 2**32: any single flipped bit changes it, values moved
    to other places change it, and random damage goes unseen with odds of 2**-32. Computed
    where the array lives: a sharded array is summed in place, without gathering it on one
    host.

    Example:
      >>> sorted(value_checksums({"w": jnp.ones((2, 2))}))
      ["['w']"]
    """
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    sums = jax.tree.leaves(_checksum_tree(tree))
    return {path: f"{int(np.asarray(s.addressable_data(0))):08x}"
            for path, s in zip(paths, sums)}


@jax.jit
def _checksum_tree(tree: Any) -> Any:
    return jax.tree.map(_checksum, tree)


def _checksum(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize < 4:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        words = words.astype(jnp.uint32)
    else:  # 64-bit values become two words (a trailing axis)
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * np.uint32(
            stride % 2**32)
        stride *= words.shape[axis]
    # One pass: a second sum with other weights halves the speed (scripts/checksum_cost.py).
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


def _checksum_mismatch(restored: dict, saved: dict | None) -> str | None:
    """What differs between the restored arrays and the checksums saved with them, or None
    (also for a checkpoint written before checksums were)."""
    if not saved:
        return None
    differ = [f"{item}{path}" for item in ("params", "opt_state")
              for path, value in value_checksums(restored[item]).items()
              if saved.get(item, {}).get(path, value) != value]
    if not differ:
        return None
    more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
    return (f"{differ[0]}{more} read back with values that differ from the checksums written "
            "with the checkpoint (its files are damaged)")


class _Silenced:
    """Holds back the log records of some loggers while in the ``with`` block."""

    def __init__(self, *loggers: logging.Logger):
        self._loggers = loggers

    def __enter__(self):
        self._saved = [(log, log.disabled) for log in self._loggers]
        for log in self._loggers:
            log.disabled = True
        return self

    def __exit__(self, *exc):
        for log, disabled in self._saved:
            log.disabled = disabled


def _check_identity(meta: dict, identity: dict, directory: str) -> None:
    saved = meta.get("identity", {})
    diff = sorted(k for k in identity if saved.get(k) != identity[k])
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {identity[k]!r}"
                            for k in diff)
        raise ResumeError(f"--resume: the checkpoint in {directory} is from a different run "
                          f"({details})")


def _what_is_wrong(err: Exception) -> str:
    """The first line of the innermost error: tensorstore's names the file and the fault."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:300]


def _first_unreadable_value(store_dir: str, in_flight: int = 16) -> str | None:
    """Reads every key of the OCDBT store in ``store_dir``, a few at a time: what is wrong with
    the first value that does not read (its file, key and tensorstore's fault), or None."""
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{store_dir}"}).result()
    reads = collections.deque()

    def finish_oldest() -> str | None:
        key, read = reads.popleft()
        try:
            read.result()
        except Exception as err:  # tensorstore's message does not name the value
            return f"{os.path.join(store_dir, key.decode())}: {_what_is_wrong(err)}"
        return None

    for key in store.list().result():
        reads.append((key, store.read(key)))
        if len(reads) >= in_flight and (why := finish_oldest()):
            return why
    while reads:
        if why := finish_oldest():
            return why
    return None


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)

