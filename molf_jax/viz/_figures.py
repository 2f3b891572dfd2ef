"""The routing-dynamics and loss figures of one run (matplotlib, no pyplot state).

Each builder returns a ``matplotlib.figure.Figure`` of a fixed pixel size, so a caller (or a
test) can inspect its axes and lines before or instead of saving it.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from molf_jax.models import PROJECTIONS
from molf_jax.viz._runlog import RoutingLog, RunRecord, layer_of, projection_of

__all__ = ["DPI", "fraction_figure", "heatmap_figure", "loss_figure", "projection_types",
           "save_figure"]

DPI = 100
FRACTION_SIZE = (11.0, 5.0)  # inches per panel row; 1100 x 500 px for one panel
LOSS_SIZE = (10.0, 5.0)
HEATMAP_PANEL = (3.2, 2.6)  # inches per heatmap panel
# One colour per projection type (tab10 minus grey), and a qualitative map for experts.
_LINE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                 "tab:pink", "tab:olive", "tab:cyan")
_EXPERT_COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf")
# Lines are averaged over about this many points when a run logged many more steps.
_SMOOTH_POINTS = 100


def projection_types(modules: tuple[str, ...]) -> list[str]:
    """The projection types present, in q, k, v, o, gate, up, down order (others after)."""
    present = {projection_of(m) for m in modules}
    known = [p for p in PROJECTIONS if p in present]
    return known + sorted(present - set(known))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start)."""
    if window <= 1:
        return values
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(len(values)) + 1 - counts]) / counts


def _plotted_experts(log: RoutingLog) -> list[int]:
    """Columns to draw in the fraction figure: FFT when any module has it (molf), else every
    LoRA column (molfe: the ranks)."""
    if log.valid[:, 0].any():
        return [0]
    return [e for e in range(len(log.experts)) if log.valid[:, e].any()]


def fraction_figure(record: RunRecord) -> Figure:
    """Fraction of modules whose update came from an expert, over steps, per projection type.

    For molf runs one panel: the FFT expert. For molfe runs one panel per LoRA expert (rank).
    Each panel has one line per projection type plus a dashed line over all modules.

    Example:
      >>> fig = fraction_figure(read_run("runs/molf"))   # doctest: +SKIP
      >>> fig.savefig("fraction.png")                     # doctest: +SKIP
    """
    log = _routing(record)
    columns = _plotted_experts(log)
    types = projection_types(log.modules)
    row_types = np.asarray([projection_of(m) for m in log.modules])
    window = max(1, len(log.steps) // _SMOOTH_POINTS)

    width, height = FRACTION_SIZE
    fig = Figure(figsize=(width, height * len(columns)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(columns), 1, squeeze=False)[:, 0]
    for ax, column in zip(axes, columns):
        for colour, kind in zip(itertools.cycle(_LINE_COLOURS), types):
            rows = (row_types == kind) & log.valid[:, column]
            if rows.any():
                share = log.winners[:, rows, column].mean(axis=1)
                ax.plot(log.steps, _smooth(share, window), color=colour, lw=1.4,
                        label=f"{kind} ({int(rows.sum())})")
        rows = log.valid[:, column]
        ax.plot(log.steps, _smooth(log.winners[:, rows, column].mean(axis=1), window),
                color="black", lw=2.0, ls="--", label=f"all ({int(rows.sum())})")
        name = "FFT" if column == 0 else log.experts[column]
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("optimizer step")
        ylabel = f"fraction choosing {name}"
        if window > 1:
            ylabel += f"\n(mean of last {window} logged steps)"
        ax.set_ylabel(ylabel)
        ax.set_title(f"Modules whose update came from the {name} expert")
        ax.grid(alpha=0.3)
        ax.legend(title="projection (modules)", loc="center left", bbox_to_anchor=(1.01, 0.5),
                  fontsize="small")
    fig.suptitle(f"MoLF routing by projection type: {record.describe()}")
    return fig


def heatmap_figure(record: RunRecord) -> Figure:
    """Winning expert per layer (rows) and logged step (columns), one panel per projection.

    With top-k > 1 the cell shows the applied expert with the highest score. Cells of modules
    that do not exist (a projection missing in a layer) are left blank.

    Example:
      >>> heatmap_figure(read_run("runs/molfe")).savefig("heatmap.png")   # doctest: +SKIP
    """
    log = _routing(record)
    types = projection_types(log.modules)
    layers = [layer_of(m) for m in log.modules]
    num_layers = max(layers) + 1
    winner = log.top_winner()  # [S, M]
    shown = [e for e in range(len(log.experts)) if log.valid[:, e].any()]
    code = {e: i for i, e in enumerate(shown)}
    cmap = ListedColormap([_EXPERT_COLOURS[e % len(_EXPERT_COLOURS)] for e in shown])
    cmap.set_bad("white")
    norm = BoundaryNorm(np.arange(len(shown) + 1) - 0.5, len(shown))
    step_edges = _edges(log.steps)
    layer_edges = np.arange(num_layers + 1) - 0.5

    ncols = min(4, len(types))
    nrows = math.ceil(len(types) / ncols)
    panel_w, panel_h = HEATMAP_PANEL
    fig = Figure(figsize=(panel_w * ncols, panel_h * nrows + 1.0), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    for index, ax in enumerate(axes.flat):
        if index >= len(types):
            ax.set_axis_off()
            continue
        kind = types[index]
        grid = np.full((num_layers, len(log.steps)), np.nan)
        for row, (module, layer) in enumerate(zip(log.modules, layers)):
            if projection_of(module) == kind:
                grid[layer] = [code.get(int(w), np.nan) for w in winner[:, row]]
        ax.pcolormesh(step_edges, layer_edges, np.ma.masked_invalid(grid), cmap=cmap, norm=norm)
        ax.set_title(kind)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("layer")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.label_outer()
        if index + ncols >= len(types):  # nothing below it: keep its step axis readable
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("optimizer step")
    handles = [Patch(facecolor=cmap(i), edgecolor="none", label=log.experts[e])
               for i, e in enumerate(shown)]
    fig.legend(handles=handles, title="winning expert", loc="outside lower center",
               ncols=len(handles))
    fig.suptitle(f"Winning expert per layer and step: {record.describe()}")
    return fig


def loss_figure(record: RunRecord) -> Figure:
    """The training loss (mean over each logging interval) against the optimizer step.

    Example:
      >>> loss_figure(read_run("runs/lora")).savefig("loss.png")   # doctest: +SKIP
    """
    fig = Figure(figsize=LOSS_SIZE, dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot(record.metric_steps, record.loss, color="tab:blue", lw=1.4, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over the logging interval)")
    ax.set_title(f"Training loss: {record.describe()}")
    ax.grid(alpha=0.3)
    return fig


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each logged step (midpoints; half a gap beyond the ends)."""
    steps = steps.astype(np.float64)
    if len(steps) == 1:
        return np.asarray([steps[0] - 0.5, steps[0] + 0.5])
    mids = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - mids[0]], mids, [2 * steps[-1] - mids[-1]]])


def _routing(record: RunRecord) -> RoutingLog:
    if record.routing is None:
        raise ValueError(f"{record.run_dir}: a {record.mode} run has no routing log (only "
                         "molf and molfe runs route)")
    return record.routing


def save_figure(fig: Figure, path: Path) -> Path:
    """Saves at the figure's own size and DPI (no tight bounding box: the size is fixed)."""
    fig.savefig(path, dpi=DPI)
    return path
