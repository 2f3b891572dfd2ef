"""Orbax checkpoints of a run: trainable params, optimizer state (routing state included) and a
JSON record of the step, data position, seed and model identity.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
while saving leaves no checkpoint that loads as complete; `latest_step` only sees finished ones.
Frozen leaves are not saved: they come back from the model source, and the identity check makes
sure it is the same model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from molf_jax.run_dir import RunDir

__all__ = ["RunCheckpointer", "ResumeError"]


class ResumeError(RuntimeError):
    """A resume that cannot continue this run (no checkpoint, or another model or mode)."""


class RunCheckpointer:
    """Saves and restores ``(params, opt_state, meta)`` under ``<out_dir>/checkpoints``.

    Example:
      >>> ckpt = RunCheckpointer("runs/x", keep=2)                  # doctest: +SKIP
      >>> ckpt.save(100, params, opt_state, {"data": it.state()})
      >>> params, opt_state, meta = ckpt.restore(params, opt_state)
    """

    def __init__(self, out_dir: str | os.PathLike, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(RunDir(out_dir).checkpoints)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, params_like: Any, opt_state_like: Any, *,
                identity: dict | None = None) -> tuple[Any, Any, dict]:
        """Restores the latest checkpoint onto the shardings of the given trees.

        Raises:
          ResumeError: when there is no finished checkpoint, or its identity (model, mode,
            LoRA ranks, parameter shapes) differs from ``identity``.
        """
        step = self.latest_step()
        if step is None:
            raise ResumeError(f"--resume: no finished checkpoint in {self.directory}")
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        if identity is not None:
            saved = meta.get("identity", {})
            diff = sorted(k for k in identity if saved.get(k) != identity[k])
            if diff:
                details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {identity[k]!r}"
                                    for k in diff)
                raise ResumeError(f"--resume: the checkpoint in {self.directory} is from a "
                                  f"different run ({details})")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params_like)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state_like))))
        return restored["params"], restored["opt_state"], meta

    def latest_params(self) -> tuple[int, Any]:
        """(step, trainable params) of the latest finished checkpoint, each array whole on this
        process's first device, whatever topology saved it (several processes, another mesh).
        """
        step = self.latest_step()
        if step is None:
            raise ResumeError(f"no finished checkpoint in {self.directory}")
        saved = self._manager.item_metadata(step)["params"]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              saved)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
        return step, restored["params"]

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
