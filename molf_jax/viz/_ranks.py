"""AdaLoRA's rank allocation over a run: reading ``rank_modules.json`` + ``ranks.jsonl`` and
the figure (kept rank per module and step, and the mean per projection type)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from matplotlib.figure import Figure

from molf_jax.run_dir import RunDir
from molf_jax.viz._figures import DPI, _LINE_COLOURS, _edges, projection_types
from molf_jax.viz._runlog import (_last_per_step, _read_json, _read_jsonl, layer_of,
                                  projection_of)

__all__ = ["RankLog", "rank_figure", "read_ranks"]

RANK_SIZE = (13.0, 5.5)


@dataclasses.dataclass(frozen=True)
class RankLog:
    """Kept ranks of an adalora run.

    Attributes:
      modules: one name per module (``layers/3/self_attn/q_proj``).
      init_r: every module's rank before pruning.
      steps: int [S]; ranks: int [S, M]; budget: int [S] (the allocator's total).
    """

    modules: tuple[str, ...]
    init_r: int
    steps: np.ndarray
    ranks: np.ndarray
    budget: np.ndarray


def read_ranks(run_dir: str | os.PathLike) -> RankLog | None:
    """The rank log of an adalora run, or None when the run has none.

    Raises:
      ValueError: a malformed file (the message names it).

    Example:
      >>> read_ranks("runs/adalora").ranks[-1].sum()   # doctest: +SKIP
    """
    run_dir = RunDir(run_dir)
    if not run_dir.rank_table.exists():
        return None
    table = _read_json(run_dir.rank_table)
    modules = tuple(table.get("modules", ()))
    rows = _read_jsonl(run_dir.ranks)
    for number, row in rows:
        if len(row.get("ranks", ())) != len(modules):
            raise ValueError(f"{run_dir.ranks}:{number}: {len(row.get('ranks', ()))} "
                             f"ranks for {len(modules)} modules")
    keep = _last_per_step([row["step"] for _, row in rows])
    rows = [rows[i][1] for i in keep]
    return RankLog(modules, int(table["init_r"]), np.asarray([r["step"] for r in rows]),
                   np.asarray([r["ranks"] for r in rows], np.int64),
                   np.asarray([r["budget"] for r in rows], np.int64))


def rank_figure(log: RankLog, title: str) -> Figure:
    """Left: kept rank per module (rows: projection type, then layer) and step. Right: mean
    kept rank per projection type, and the budget per module.

    Example:
      >>> rank_figure(read_ranks("runs/adalora"), "adalora").savefig("ranks.png")  # doctest: +SKIP
    """
    fig = Figure(figsize=RANK_SIZE, dpi=DPI, layout="constrained")
    heat, lines = fig.subplots(1, 2, width_ratios=(3, 2))
    kinds = projection_types(log.modules)
    order = sorted(range(len(log.modules)), key=lambda m: (
        kinds.index(projection_of(log.modules[m])), layer_of(log.modules[m])))
    image = heat.pcolormesh(_edges(log.steps), np.arange(len(order) + 1),
                            log.ranks[:, order].T, vmin=0, vmax=log.init_r, cmap="viridis")
    fig.colorbar(image, ax=heat, label="kept rank")
    starts = [i for i, m in enumerate(order)
              if i == 0 or projection_of(log.modules[m]) != projection_of(log.modules[order[i - 1]])]
    heat.set_yticks([s + 0.5 for s in starts], [projection_of(log.modules[order[s]])
                                                for s in starts])
    heat.set_xlabel("optimizer step")
    heat.set_title("kept rank per module (layers top to bottom within a type)")
    for colour, kind in zip(_LINE_COLOURS, kinds):
        columns = [m for m in range(len(log.modules)) if projection_of(log.modules[m]) == kind]
        lines.plot(log.steps, log.ranks[:, columns].mean(axis=1), color=colour, label=kind)
    lines.plot(log.steps, log.budget / len(log.modules), color="black", ls="--",
               label="budget per module")
    lines.set_xlabel("optimizer step")
    lines.set_ylabel("mean kept rank")
    lines.set_ylim(0, log.init_r + 0.5)
    lines.legend(fontsize="small")
    lines.grid(alpha=0.3)
    fig.suptitle(f"AdaLoRA rank allocation: {title}")
    return fig
