"""The one place that names the files of a run directory.

``molf-jax train`` writes a run directory; the plotter, ``molf-jax export`` and
``scripts/reproduce.py`` read it. Every one of them asks `RunDir` for a path, so a file is
renamed here and nowhere else.

Example:
  >>> run = RunDir("runs/molf")
  >>> run.metrics.name, run.merged.name
  ('metrics.jsonl', 'merged')
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

__all__ = ["RunDir"]


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
    """

    path: Path

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

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

    def require(self) -> RunDir:
        """Returns self, or raises FileNotFoundError when no run was started here."""
        if not self.config.is_file():
            raise FileNotFoundError(f"{self.path} is not a run directory: no {self.config.name}")
        return self

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)
