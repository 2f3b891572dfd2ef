"""Pictures of a run: routing dynamics (which expert each module chose, step by step) and loss.

Example:
  >>> from molf_jax.viz import plot_run
  >>> plot_run("runs/molf")   # doctest: +SKIP
  [PosixPath('runs/molf/plots/routing_fraction.png'), ...]
"""

from __future__ import annotations

import os
from pathlib import Path

from molf_jax.paths import refuse_link, writable_folder

# Reading a run directory's logs.
from molf_jax.run_dir import RunDir
from molf_jax.viz._runlog import RoutingLog, RunRecord, layer_of, projection_of, read_run

# AdaLoRA's rank allocation.
from molf_jax.viz._ranks import RankLog, rank_figure, read_ranks

# Figures (matplotlib Figure objects, fixed pixel sizes).
from molf_jax.viz._figures import (DPI, fraction_figure, heatmap_figure, loss_figure,
                                   projection_types, save_figure)

__all__ = [
    "DPI",
    "RankLog",
    "RoutingLog",
    "RunRecord",
    "fraction_figure",
    "heatmap_figure",
    "layer_of",
    "loss_figure",
    "plot_run",
    "projection_of",
    "projection_types",
    "rank_figure",
    "read_ranks",
    "read_run",
    "save_figure",
]

FILES = {"fraction": "routing_fraction.png", "heatmap": "routing_heatmap.png",
         "loss": "loss.png", "ranks": "adalora_ranks.png"}


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
             ) -> list[Path]:
    """Writes the PNGs of a run: routing fraction and heatmap (molf, molfe), the kept ranks
    (adalora) and the loss curve.

    Args:
      run_dir: a directory written by ``molf-jax train`` (``run_config.json``,
        ``metrics.jsonl``, and for routed runs ``routing_modules.json`` + ``routing.jsonl``).
      out_dir: where the PNGs go (created); default ``run_dir/plots``.

    Returns:
      The paths written: ``routing_fraction.png``, ``routing_heatmap.png`` (routed runs only),
      ``adalora_ranks.png`` (adalora runs) and ``loss.png``.

    Raises:
      FileNotFoundError: a needed file is missing. ValueError: a file is empty or malformed.

    Example:
      >>> paths = plot_run("runs/molfe", "figures")   # doctest: +SKIP
    """
    record = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else RunDir(record.run_dir).plots
    if out_dir is None:  # a folder the user names may be a link; the run's own may not
        refuse_link(out, "run directory entry")
    figures = []
    if record.routing is not None:
        figures += [(FILES["fraction"], fraction_figure(record)),
                    (FILES["heatmap"], heatmap_figure(record))]
    ranks = read_ranks(record.run_dir)
    if ranks is not None:
        figures.append((FILES["ranks"], rank_figure(ranks, record.describe())))
    figures.append((FILES["loss"], loss_figure(record)))
    for name, _ in figures:  # checked before any is drawn over
        refuse_link(out / name, "--out file")
    writable_folder(out, "--out")
    return [save_figure(fig, out / name) for name, fig in figures]
