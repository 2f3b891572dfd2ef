"""The reproduction's tables (markdown) and plots, rendered from results.json alone.

`render` is deterministic in results.json, so a docs page that shows the tables can be kept in
step by a test: `splice` writes them between two markers, `in_step` says whether a page shows
exactly what a results.json renders to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molf_jax.experiments.stats import CLAIM_MARGIN, TASK_ORDER
from molf_jax.models import PROJECTIONS

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# The README's short form (`render_summary`) sits between these.
SUMMARY_BEGIN, SUMMARY_END = "<!-- summary:begin -->", "<!-- summary:end -->"
# Methods in the order the tables list them; any other method follows in results.json order.
METHOD_ORDER = ("fft", "lora", "molf", "molf_recipe", "molf_gate", "molfe", "molfe_top1",
                "adalora")
METHOD_NAMES = {"fft": "FFT", "lora": "LoRA", "molf": "MoLF (tuned)",
                "molf_recipe": "MoLF (recipe)", "molf_gate": "MoLF gate",
                "molfe": "MoLF-E (top-2)", "molfe_top1": "MoLF-E (top-1)", "adalora": "AdaLoRA"}
_COMPARISONS = (("fft_minus_lora", "FFT - LoRA"),
                ("molf_minus_best", "MoLF (tuned) - max(FFT, LoRA)"),
                ("molf_recipe_minus_best", "MoLF (recipe) - max(FFT, LoRA)"),
                ("molfe_minus_lora", "MoLF-E - LoRA"),
                ("molfe_minus_adalora", "MoLF-E - AdaLoRA"))
_RETENTION_COMPARISONS = (("fft_minus_lora_retention", "FFT - LoRA, retention"),
                          ("fft_minus_lora_with_retention",
                           "FFT - LoRA, harmonic mean of task metric and retention"))
_CLAIMS = (("molf_within_1_5_of_best", f"MoLF (tuned) within {CLAIM_MARGIN:g} of max(FFT, LoRA)"),
           ("molf_recipe_within_1_5_of_best",
            f"MoLF (recipe) within {CLAIM_MARGIN:g} of max(FFT, LoRA)"),
           ("molfe_beats_lora", "MoLF-E beats LoRA"),
           ("molfe_beats_adalora", "MoLF-E beats AdaLoRA"))


def _need(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise ValueError(f"results.json: {where} has no field {key!r}")
    return mapping[key]


def _ci(c: Mapping[str, Any] | None) -> str:
    return "-" if c is None else f"{c['mean']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"


def _spread(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.1f} +- {std:.1f}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _method_rows(task: str, t: Mapping[str, Any], design: bool) -> list[list[str]]:
    methods = t["methods"]
    label = f"{task} ({t['metric']}, {t['n_test']} x {len(t['seeds'])})"
    base = t["base_model"]
    rows = [[label, "base model", "-",
             "-" if base is None else f"{base['test']:.1f}",
             "-" if base is None or base["retention"] is None else f"{base['retention']:.1f}"]
            + (["-"] if design else [])]
    order = [m for m in METHOD_ORDER if m in methods] + [m for m in methods
                                                          if m not in METHOD_ORDER]
    for m in order:
        x = methods[m]
        rows.append([label, METHOD_NAMES.get(m, m), x["setting"], _spread(x["mean"], x["std"]),
                     _spread(x["retention_mean"], x["retention_std"])]
                    + ([_spread(x.get("with_retention_mean"), x.get("with_retention_std"))]
                       if design else []))
    return rows


def _comparison_lines(tasks: Mapping[str, Any]) -> list[str]:
    """The paired differences (and retention's) and the claim table."""
    lines = ["Differences in points, with 95% paired-bootstrap intervals over test cases "
             "pooled over seeds; max(FFT, LoRA) is the one with the better validation metric.",
             ""]
    lines += _table(["task", "max(FFT, LoRA)", *(name for _, name in _COMPARISONS)],
                    [[task, METHOD_NAMES.get(t["best_of_fft_lora"], "-"),
                      *(_ci(t.get(k)) for k, _ in _COMPARISONS)] for task, t in tasks.items()])
    shown = [(k, name) for k, name in _RETENTION_COMPARISONS
             if any(t.get(k) is not None for t in tasks.values())]
    if shown:
        lines += [""] + _table(["task", *(name for _, name in shown)],
                               [[task, *(_ci(t.get(k)) for k, _ in shown)]
                                for task, t in tasks.items()])

    kinds = {task: t["by_kind"] for task, t in tasks.items() if t.get("by_kind")}
    for task, k in kinds.items():
        lines += ["", f"{task}: execution accuracy on the test cases of query kinds training "
                      f"saw ({k['n_trained_kinds']} cases over seeds) and of kinds it never saw "
                      f"({k['n_held_out_kinds']}).", ""]
        lines += _table(["method", "trained kinds", "held-out kinds"],
                        [[METHOD_NAMES.get(m, m), f"{x['trained_kinds']:.1f}",
                          f"{x['held_out_kinds']:.1f}"] for m, x in k["methods"].items()])

    lines += ["", "Claims: yes / no when the whole 95% interval lies above / below the "
                  "threshold, else inconclusive.", ""]
    lines += _table(["task", *(name for _, name in _CLAIMS)],
                    [[task, *(t["claims"].get(k) or "-" for k, _ in _CLAIMS)]
                     for task, t in tasks.items()])
    return lines


def _run_lines(results: Mapping[str, Any]) -> list[str]:
    """Incomplete methods, and the run itself: runs, device, wall time, failures, command."""
    tasks = results["tasks"]
    lines: list[str] = []
    left_out = [f"{task} {m} ({why})" for task, t in tasks.items()
                for m, why in (t.get("incomplete") or {}).items()]
    if left_out:
        lines += ["", "Not summarised (incomplete): " + "; ".join(left_out) + "."]
    failed = _need(results, "failed_runs", "the top level")
    wall = _need(results, "plan_wall_seconds", "the top level")
    lines += ["", f"{_need(results, 'runs', 'the top level')} runs on "
                  f"{_need(results, 'device', 'the top level')}; plan wall time "
                  + ("-" if wall is None else f"{wall:.0f} s")
                  + "; failed runs: " + (", ".join(failed) if failed else "none") + "."]
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return lines


def render_summary(results: Mapping[str, Any]) -> str:
    """The README's short form: the differences with their intervals, the claims and the run.

    Example:
      >>> text = render_summary(json.loads(Path("reproduce_results/results.json").read_text()))
      ... # doctest: +SKIP
    """
    tasks = _need(results, "tasks", "the top level")
    return "\n".join(_comparison_lines(tasks) + _run_lines(results)) + "\n"


def render(results: Mapping[str, Any]) -> str:
    """The reproduction's tables (markdown) from a results.json dict.

    Per task: each method's test metric (mean +- std over seeds), the setting chosen on the
    first seed's validation split and its retention of the base model's known facts; the
    paired differences with 95% intervals; the claim table; the routing study; the device,
    runs, wall time and failed runs.

    Example:
      >>> text = render(json.loads(Path("reproduce_results/results.json").read_text()))
      ... # doctest: +SKIP
    """
    tasks = _need(results, "tasks", "the top level")
    design = any("with_retention_mean" in m for t in tasks.values() for m in t["methods"].values())
    first_seed = next((t["seeds"][0] for t in tasks.values()), None)
    header = ["task (metric, test cases x seeds)", "method",
              f"setting (best validation, seed {first_seed})", "test", "retention"]
    header += ["harmonic mean of test and retention"] if design else []
    lines = ["Test metric, mean +- std over seeds (0-100); retention: share of the base model's "
             "known cloze facts still answered after training.", ""]
    lines += _table(header, [r for task, t in tasks.items() for r in _method_rows(task, t, design)])

    lines += [""] + _comparison_lines(tasks)

    study = results.get("study") or []
    if study:
        lines += ["", f"Routing study (seed {first_seed}): how often the counted expert was "
                      "applied, % of module-steps, overall and per projection type.", ""]
        lines += _table(
            ["task", "variant", "setting", "LoRA/FFT rate", "top-k", "score", "test", "expert",
             "share", *(p.replace("_proj", "") for p in PROJECTIONS)],
            [[s["task"], s["variant"], s["setting"], s["lr_ratio"], s["top_k"], s["score"],
              f"{s['test']:.1f}", s["expert"], f"{s['share']:.1f}",
              *(f"{s['share_by_projection'][p]:.0f}" if p in s["share_by_projection"] else "-"
                for p in PROJECTIONS)] for s in study])

    lines += _run_lines(results)
    return "\n".join(lines) + "\n"


def splice(page: str, tables: str, markers: tuple[str, str] = (BEGIN, END)) -> str:
    """``page`` with the text between the two ``markers`` replaced by ``tables``.

    Example:
      >>> splice("a\\n<!-- results:begin -->\\nold\\n<!-- results:end -->\\nb", "new\\n")
      'a\\n<!-- results:begin -->\\nnew\\n<!-- results:end -->\\nb'
    """
    start, end = _markers(page, markers)
    return page[:start] + "\n" + tables.strip() + "\n" + page[end:]


def _markers(page: str, markers: tuple[str, str]) -> tuple[int, int]:
    """Where the spliced block starts (after the first marker) and ends (at the second)."""
    begin, end_marker = markers
    if page.count(begin) != 1 or page.count(end_marker) != 1:
        raise ValueError(f"the page needs exactly one {begin} and one {end_marker} "
                         f"(has {page.count(begin)} and {page.count(end_marker)})")
    start, end = page.index(begin) + len(begin), page.index(end_marker)
    if end < start:
        raise ValueError(f"{end_marker} comes before {begin}")
    return start, end


def in_step(page: str, results: Mapping[str, Any], *, summary: bool = False) -> bool:
    """Whether the page shows, between its markers, exactly what ``results`` renders to: the
    full tables (`render`, between `BEGIN` and `END`) or with ``summary`` the README's short
    form (`render_summary`, between `SUMMARY_BEGIN` and `SUMMARY_END`).

    Example:
      >>> in_step(Path("docs/reproduction.md").read_text(),
      ...         json.loads(Path("reproduce_results/results.json").read_text()))
      ... # doctest: +SKIP
    """
    if summary:
        start, end = _markers(page, (SUMMARY_BEGIN, SUMMARY_END))
        return page[start:end].strip() == render_summary(results).strip()
    start, end = _markers(page, (BEGIN, END))
    return page[start:end].strip() == render(results).strip()


def plot_study(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
               out_dir: Path) -> list[Path]:
    """Draws ``plots/fft_share_<task>.png`` (MoLF at the authors' recipe, first seed: the FFT
    expert's share per projection type over steps) and ``plots/rate_ratio.png`` (the FFT
    share and the test metric against the LoRA/FFT rate ratio). Returns the files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    tasks = list(results.get("tasks", {})) or list(TASK_ORDER)
    seeds = [t["seeds"][0] for t in results.get("tasks", {}).values()]
    first = seeds[0] if seeds else min((r["seed"] for r in rows), default=0)
    written = []
    for task in tasks:
        r = next((r for name in ("molf_recipe", "molf") for r in rows
                  if (r["task"], r["method"], r["seed"]) == (task, name, first)
                  and r.get("routing")), None)
        if r is None:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for p, values in r["routing"]["share_by_projection"].items():
            ax.plot(r["routing"]["steps"], 100 * np.asarray(values), label=p)
        ax.set(xlabel="optimizer step", ylabel="FFT expert chosen, % of layers",
               title=f"{task}: {r['method']} {r['label']} (seed {first})", ylim=(-3, 103))
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(plots / f"fft_share_{task}.png", dpi=110)
        plt.close(fig)
        written.append(plots / f"fft_share_{task}.png")
    study = [s for s in results.get("study") or []
             if s["variant"] in ("molf_recipe", "molf_ratio3", "molf_ratio10")]
    if not study:
        return written
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for task in tasks:
        points = sorted((float(s["lr_ratio"]), s["share"], s["test"])
                        for s in study if s["task"] == task)
        if points:
            x, share, test = zip(*points)
            left.plot(x, share, "o-", label=task)
            right.plot(x, test, "o-", label=task)
    left.set(xscale="log", xlabel="LoRA rate / FFT rate", ylabel="FFT expert chosen, %")
    right.set(xscale="log", xlabel="LoRA rate / FFT rate", ylabel="test metric")
    left.legend()
    fig.tight_layout()
    fig.savefig(plots / "rate_ratio.png", dpi=110)
    plt.close(fig)
    return written + [plots / "rate_ratio.png"]
