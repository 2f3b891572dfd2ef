"""SQL test accuracy split by query kind: kinds training saw against kinds it never saw.

With ``held_out_kinds`` (`molf_jax.experiments.plan.SQL_HELD_OUT`), about a quarter of the SQL
test cases ask for a query shape absent from training; the task's one metric mixes the two
parts. This split shows which part tells the methods apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from molf_jax.experiments.plan import PRESETS

__all__ = ["held_out_flags", "sql_by_kind"]


def held_out_flags(preset: str, seed: int) -> np.ndarray | None:
    """Per SQL test case of ``seed`` (in row order): whether its query kind was held out of
    training; None when the preset holds out no kind."""
    from molf_jax.data import load_task

    size = PRESETS[preset].get("sql")
    if size is None or not dict(size.offline_options).get("held_out_kinds"):
        return None
    data = load_task("sql", "offline", size=size.task_size, seed=seed,
                     offline_options=dict(size.offline_options), eval_size=size.eval_size)
    test = data.eval[size.val:size.val + size.test]
    return np.asarray([bool(r["held_out_kind"]) for r in test])


def sql_by_kind(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                preset: str) -> dict[str, Any] | None:
    """Per method (its chosen setting, over the summary's seeds): execution accuracy on the
    test cases of trained kinds and of held-out kinds, with the case counts.

    Args:
      summary: the sql entry of `summarise` (methods, their settings and seeds).
      rows: the sweep's rows.
      preset: the plan's preset (which kinds were held out).
    """
    flags = {s: held_out_flags(preset, s) for s in summary["seeds"]}
    if any(f is None for f in flags.values()):
        return None
    by_key = {(r["method"], r["label"], r["seed"]): r for r in rows if r["task"] == "sql"}
    out: dict[str, Any] = {"n_trained_kinds": int(sum((~f).sum() for f in flags.values())),
                           "n_held_out_kinds": int(sum(f.sum() for f in flags.values())),
                           "methods": {}}
    for method, entry in summary["methods"].items():
        seen, held = [], []
        for seed, f in flags.items():
            correct = np.asarray(by_key[(method, entry["setting"], seed)]["test_cases"]["correct"],
                                 float)
            if len(correct) != len(f):
                raise ValueError(f"sql {method} seed {seed}: {len(correct)} test cases, but the "
                                 f"preset {preset!r} gives {len(f)}")
            seen.append(correct[~f])
            held.append(correct[f])
        out["methods"][method] = {
            "trained_kinds": round(100 * float(np.concatenate(seen).mean()), 2),
            "held_out_kinds": round(100 * float(np.concatenate(held).mean()), 2)}
    return out
