"""What a run writes for people and plots: metrics, routing, AdaLoRA ranks, TensorBoard events.

Files in the run directory (named by `molf_jax.run_dir.RunDir`):

* ``metrics.jsonl``: one object per logging interval: step, loss (mean over the interval's
  finished steps), lr_fft, lr_lora, grad_norm, tokens_per_s, skipped (non-finite steps so far),
  and for routed modes fft_fraction (molf) and expert_fraction (one value per expert column).
* ``routing_modules.json``: the routing table: module row names, expert column labels, and which
  cells exist.
* ``routing.jsonl``: per logged step, each module's winners (0/1 per expert column) and scores
  (null where the module has no such expert).
* ``rank_modules.json`` (adalora): ``modules`` (one name per module, layer index included) and
  ``init_r``.
* ``ranks.jsonl`` (adalora): per logged step, ``ranks`` (each module's kept rank after the
  step, in the order of ``modules``) and ``budget`` (the total the allocator last allowed).

The per-step logs are a transaction log of the checkpoints: the loop writes every step's rows
before it saves that step, and a resumed run first cuts each log back to the restored step, so
after any kill and ``--resume`` every step appears exactly once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from molf_jax.paths import as_path, open_appending, refuse_link, write_replacing
from molf_jax.run_dir import RunDir

__all__ = ["RunLog", "cut_log"]


class RunLog:
    """Appends JSON lines (and optional TensorBoard scalars) under a run directory.

    With ``write=False`` (every process but the first of a multi-process run) it writes
    nothing: the processes see the same metrics, and one copy of each file is kept.

    Args:
      run_dir: the run directory.
      tensorboard: also write TensorBoard scalars (needs tensorboardX).
      resume_step: the step a resumed run continues from: rows of later steps (written after
        that checkpoint, before the run died) are dropped first, and TensorBoard is told to
        purge its events past it. None for a fresh run.
      write: False on every process but the first.

    Example:
      >>> log = RunLog("runs/x", resume_step=6)    # keeps the rows of steps 1..6  # doctest: +SKIP
      >>> log.metrics({"step": 7, "loss": 2.5})                                    # doctest: +SKIP
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False,
                 resume_step: int | None = None, write: bool = True):
        self._write = write
        self._metrics = self._routing = self._ranks = self._tb = None
        if not write:
            return
        self.run_dir = RunDir(run_dir)
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for path in self.run_dir.step_logs:
                cut_log(path, resume_step)
        self._metrics = open_appending(self.run_dir.metrics)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as err:
                raise RuntimeError("--tensorboard needs the tensorboardX package: pip install "
                                   "'molf_jax[tensorboard]'") from err
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.run_dir.tensorboard), purge_step=purge)

    def write_routing_table(self, module_names, expert_labels, valid: np.ndarray) -> None:
        if not self._write:
            return
        write_replacing(self.run_dir.routing_table, json.dumps({
            "modules": list(module_names), "experts": list(expert_labels),
            "valid": np.asarray(valid).astype(bool).tolist()}))
        self._routing = open_appending(self.run_dir.routing)

    def write_rank_modules(self, module_names, init_r: int) -> None:
        if not self._write:
            return
        write_replacing(self.run_dir.rank_table,
                        json.dumps({"modules": list(module_names), "init_r": int(init_r)}))
        self._ranks = open_appending(self.run_dir.ranks)

    def ranks(self, step: int, ranks: np.ndarray, budget: int) -> None:
        if self._ranks is None:
            return
        self._ranks.write(json.dumps({"step": step, "ranks": np.asarray(ranks).tolist(),
                                      "budget": int(budget)}) + "\n")

    def metrics(self, row: dict[str, Any]) -> None:
        if not self._write:
            return
        self._metrics.write(json.dumps(_plain(row)) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, row["step"])

    def routing(self, step: int, winners: np.ndarray, scores: np.ndarray) -> None:
        if self._routing is None:
            return
        scores = [[None if not math.isfinite(s) else float(s) for s in row] for row in scores]
        self._routing.write(json.dumps({"step": step,
                                        "winners": np.asarray(winners).astype(int).tolist(),
                                        "scores": scores}) + "\n")

    def flush(self) -> None:
        """Writes what is logged so far (before each checkpoint: a remote log is one object
        rewritten whole, `molf_jax.paths.open_appending`; a local one is written line by
        line)."""
        for log in (self._metrics, self._routing, self._ranks):
            if log is not None:
                log.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._routing is not None:
            self._routing.close()
        if self._ranks is not None:
            self._ranks.close()
        if self._tb is not None:
            self._tb.close()


def cut_log(path: Path, last_step: int) -> int:
    """Keeps the rows of ``path`` whose step is at most ``last_step``; returns how many went.

    A line torn by a kill mid-write (not valid JSON) goes too. The file is rewritten beside
    itself (under a fresh name, never one planted before) and renamed over, so a kill during
    the cut leaves the old or the new file, whole.

    Example:
      >>> cut_log(Path("runs/x/metrics.jsonl"), 6)   # rows of steps 7, 8 dropped  # doctest: +SKIP
      2
    """
    refuse_link(path, "run directory entry")
    path = as_path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_replacing(path, "".join(kept))
    return dropped


def _plain(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out
