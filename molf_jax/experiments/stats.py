"""Statistics of a reproduction sweep: tuning on validation, paired bootstrap, claim verdicts.

Pure functions over *rows*, one dict per trained member or base model::

    {"task": "fact", "method": "fft", "label": "fft_lr=5e-05", "setting": {...}, "seed": 0,
     "val": 41.2, "test": 39.8, "n_test": 1280, "retention": 93.1,
     "test_cases": {"paraphrase": [...], "neighborhood": [...], "efficacy": [...],
                    "retained": [1, 0, ...]},        # per probe fact, another length
     "routing": {...}}                               # routed methods only

``test_cases`` holds per-case test scores: ``{"correct": [0/1, ...]}`` for sql and med, the
paraphrase, neighbourhood and efficacy score of each edit for fact. ``retained`` (optional) says,
per probe fact the base model answered before training, whether the trained model still does.

Every method is tuned by one procedure: per (task, method) the setting of its grid with the best
validation metric on the first seed (ties: the one listed first). Only that setting's seeds are
summarised, exactly as if the later seeds had run only the chosen setting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# The metric each known task is judged by. Fact: the harmonic mean of the paraphrase and
# neighbourhood scores (prompts that were never trained).
PRIMARY = {"sql": "execution_accuracy", "med": "accuracy", "fact": "heldout_score"}
TASK_ORDER = ("med", "fact", "sql")  # the order of results.json and its tables
FACT_PARTS = ("paraphrase", "neighborhood")
RETAINED = "retained"  # the test_cases key of the forgetting probe
CLAIM_MARGIN = 1.5  # points: "MoLF is within 1.5 points of the better of FFT and LoRA"
BOOTSTRAP_SAMPLES = 2000
CI_PERCENTILES = (2.5, 97.5)  # a two-sided 95% percentile interval

Cases = Mapping[str, Sequence[float]]
# A bootstrap sample: named groups resampled independently (task cases, probe facts), each a
# mapping of equally long per-case arrays.
Groups = Mapping[str, Mapping[str, np.ndarray]]


def _harmonic(x: float, y: float) -> float:
    return 0.0 if min(x, y) <= 0 else 2 / (1 / x + 1 / y)


def metric_of(task: str, cases: Cases) -> float:
    """The task's metric (0-100) from per-case scores; a ``retained`` key is ignored.

    Args:
      task: the task name (named in the error when the cases fit no metric).
      cases: ``{"correct": [...]}`` (accuracy) or the fact task's per-case scores (the
        harmonic mean of the mean paraphrase and neighbourhood scores).

    Example:
      >>> metric_of("sql", {"correct": [1, 0, 0, 0]})
      25.0
    """
    if "correct" in cases:
        return 100 * float(np.mean(cases["correct"]))
    if all(part in cases for part in FACT_PARTS):
        return 100 * _harmonic(*(float(np.mean(cases[part])) for part in FACT_PARTS))
    raise ValueError(f"task {task!r}: test_cases has {sorted(cases)}, neither 'correct' nor "
                     f"{' and '.join(FACT_PARTS)}")


def retention_of(retained: Sequence[float]) -> float:
    """Share (0-100) of the base model's known probe facts still answered after training.

    Example:
      >>> retention_of([1, 1, 0, 1])
      75.0
    """
    return 100 * float(np.mean(retained))


def metric_with_retention(metric: float, retention: float) -> float:
    """The design metric that asks for both: harmonic mean of a task metric and retention
    (both 0-100); 0 when either is 0.

    Example:
      >>> round(metric_with_retention(50.0, 100.0), 2)  # 2 / (1/50 + 1/100)
      66.67
    """
    return 100 * _harmonic(metric / 100, retention / 100)


def percentile_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95% percentile interval (2.5th and 97.5th percentiles, linear interpolation).

    Example:
      >>> percentile_interval(np.arange(41.0))  # positions 1 and 39 of 0..40
      (1.0, 39.0)
    """
    low, high = np.percentile(np.asarray(values, float), CI_PERCENTILES)
    return float(low), float(high)


def paired_bootstrap(a: Groups, b: Groups, statistic: Callable[[Groups], float], *,
                     samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                     draws: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """statistic(a) - statistic(b) with a 95% paired-bootstrap interval.

    Each group (for example the task cases and the probe facts) is resampled with its own
    indices; within a group ``a`` and ``b`` are resampled with the *same* indices, so each case
    keeps its pair.

    Args:
      a, b: ``{group: {key: per-case array}}``, the same groups and lengths on both sides.
      statistic: maps one side's (resampled) groups to a number.
      samples: bootstrap resamples.
      seed: seed of the resampling (the default makes results.json reproducible).
      draws: explicit resample indices, ``{group: int array [samples, n_group]}``, in place
        of random ones (a hand-computed check, or a resampling scheme of your own).

    Returns:
      ``{"mean": full-sample difference, "ci95": [low, high]}``, rounded to 0.01.

    Example:
      >>> same = {"cases": {"correct": np.array([1, 0, 1])}}
      >>> paired_bootstrap(same, same, lambda g: g["cases"]["correct"].mean(), samples=50)
      {'mean': 0.0, 'ci95': [0.0, 0.0]}
    """
    sizes = {}
    for group in a:
        lengths = {len(v) for side in (a, b) for v in side[group].values()}
        if len(lengths) != 1:
            raise ValueError(f"paired comparison: group {group!r} has arrays of lengths "
                             f"{sorted(lengths)}; both sides need the same cases")
        sizes[group] = lengths.pop()
    if draws is not None:
        samples = len(next(iter(draws.values())))
    rng = np.random.default_rng(seed)
    diffs = np.empty(samples)
    for i in range(samples):
        idx = {g: (draws[g][i] if draws is not None else rng.integers(0, n, n))
               for g, n in sizes.items()}
        diffs[i] = (statistic({g: {k: v[idx[g]] for k, v in a[g].items()} for g in a})
                    - statistic({g: {k: v[idx[g]] for k, v in b[g].items()} for g in b}))
    low, high = percentile_interval(diffs)
    return {"mean": round(float(statistic(a) - statistic(b)), 2),
            "ci95": [round(low, 2), round(high, 2)]}


def _pooled(runs: Sequence[Cases], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-case arrays concatenated over seeds (case i of seed s pairs with case i of seed s)."""
    return {k: np.concatenate([np.asarray(r[k], float) for r in runs]) for k in keys}


def paired_difference(task: str, a: Sequence[Cases], b: Sequence[Cases], *, on: str = "metric",
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                      draws: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Method a - method b in points, with a 95% paired-bootstrap interval over cases pooled
    over seeds.

    Args:
      task: the task (its metric).
      a, b: each method's ``test_cases``, one dict per seed, same seeds, same cases in the
        same order.
      on: ``"metric"`` (the task metric; resamples task cases), ``"retention"`` (the forgetting
        probe; resamples probe facts) or ``"with_retention"`` (their harmonic mean; resamples
        cases and probe facts independently, each paired across a and b).
      samples, seed, draws: as in `paired_bootstrap`; draws' groups are ``"cases"`` and
        ``"retained"``.

    Example:
      >>> paired_difference("med", [{"correct": [1, 1, 0, 1]}], [{"correct": [1, 0, 0, 1]}],
      ...                   samples=200)["mean"]
      25.0
    """
    if on not in ("metric", "retention", "with_retention"):
        raise ValueError(f"on={on!r}: expected 'metric', 'retention' or 'with_retention'")
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison over {len(a)} and {len(b)} seeds")

    def groups(runs):
        out = {}
        if on != "retention":
            out["cases"] = _pooled(runs, [k for k in runs[0] if k != RETAINED])
        if on != "metric":
            if any(RETAINED not in r for r in runs):
                raise ValueError(f"on={on!r}: a run has no {RETAINED!r} in its test_cases")
            out[RETAINED] = _pooled(runs, [RETAINED])
        return out

    def statistic(g):
        if on == "metric":
            return metric_of(task, g["cases"])
        retention = retention_of(g[RETAINED][RETAINED])
        return retention if on == "retention" else metric_with_retention(
            metric_of(task, g["cases"]), retention)

    return paired_bootstrap(groups(a), groups(b), statistic, samples=samples, seed=seed,
                            draws=draws)


def verdict(comparison: Mapping[str, Any] | None, *, at_least: float) -> str | None:
    """'yes' when the whole interval lies above ``at_least``, 'no' when it lies below, else
    'inconclusive' (an interval touching the threshold decides nothing); None without data.

    Example:
      >>> verdict({"mean": -1.0, "ci95": [-1.4, 0.2]}, at_least=-CLAIM_MARGIN)
      'yes'
    """
    if comparison is None:
        return None
    low, high = comparison["ci95"]
    return "yes" if low > at_least else "no" if high < at_least else "inconclusive"


def _key(r: Mapping[str, Any]) -> tuple:
    return r["task"], r["method"], r["label"], r["seed"]


def _check_unique(rows: Sequence[Mapping[str, Any]]) -> None:
    seen = set()
    for r in rows:
        if _key(r) in seen:
            raise ValueError("two rows for task {}, method {}, setting {}, seed {}".format(
                *_key(r)))
        seen.add(_key(r))


def incomplete_sweeps(rows: Sequence[Mapping[str, Any]], grids: Mapping[str, Sequence[str]],
                      seed: int) -> dict[tuple[str, str], list[str]]:
    """Per (task, method) with rows on ``seed`` but not every setting of its grid: the
    settings missing there (such a method cannot be tuned, so it is left out of the summary).

    Example:
      >>> incomplete_sweeps([{"task": "med", "method": "fft", "label": "a", "seed": 0}],
      ...                   {"fft": ["a", "b"]}, seed=0)
      {('med', 'fft'): ['b']}
    """
    present: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        if r["method"] in grids and r["seed"] == seed:
            present.setdefault((r["task"], r["method"]), set()).add(r["label"])
    return {key: missing for key, labels in present.items()
            if (missing := [s for s in grids[key[1]] if s not in labels])}


def choose_settings(rows: Sequence[Mapping[str, Any]], grids: Mapping[str, Sequence[str]],
                    seed: int) -> dict[tuple[str, str], str]:
    """Per (task, method): the setting label with the best validation metric on ``seed``.

    The same procedure for every method in ``grids``; ties go to the setting listed first in
    the method's grid. Methods outside ``grids`` (the base model, the routing study) and
    (task, method) pairs whose sweep on ``seed`` is incomplete are not chosen.

    Args:
      rows: rows of any seeds and settings; only ``seed``'s validation metric counts.
      grids: ordered ``{method: [setting label, ...]}``.
      seed: the first seed of the sweep.

    Example:
      >>> rows = [{"task": "med", "method": "fft", "label": l, "seed": 0, "val": v}
      ...         for l, v in (("a", 50.0), ("b", 60.0), ("c", 60.0))]
      >>> choose_settings(rows, {"fft": ["a", "b", "c"]}, seed=0)
      {('med', 'fft'): 'b'}
    """
    skip = incomplete_sweeps(rows, grids, seed)
    best: dict[tuple[str, str], tuple[float, int, str]] = {}
    for r in rows:
        key = (r["task"], r["method"])
        if r["method"] not in grids or r["seed"] != seed or key in skip:
            continue
        if r["label"] not in grids[r["method"]]:
            continue  # a setting outside the method's grid is never a candidate
        candidate = (-float(r["val"]), list(grids[r["method"]]).index(r["label"]), r["label"])
        best[key] = min(best.get(key, candidate), candidate)
    return {key: label for key, (_, _, label) in best.items()}


def _ordered_tasks(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names = {r["task"] for r in rows}
    return [t for t in TASK_ORDER if t in names] + sorted(names - set(TASK_ORDER))


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; 0 for one seed) rounded to 0.01; None with a missing value."""
    if any(v is None for v in values):
        return None, None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return round(float(np.mean(values)), 2), round(std, 2)


# (key in results.json, method a, method b or "best" for the better of FFT and LoRA)
COMPARISONS = (("fft_minus_lora", "fft", "lora"), ("molf_minus_best", "molf", "best"),
               ("molf_recipe_minus_best", "molf_recipe", "best"),
               ("molfe_minus_lora", "molfe", "lora"), ("molfe_minus_adalora", "molfe", "adalora"))
# (claim, comparison, threshold the interval must clear)
CLAIMS = (("molf_within_1_5_of_best", "molf_minus_best", -CLAIM_MARGIN),
          ("molf_recipe_within_1_5_of_best", "molf_recipe_minus_best", -CLAIM_MARGIN),
          ("molfe_beats_lora", "molfe_minus_lora", 0.0),
          ("molfe_beats_adalora", "molfe_minus_adalora", 0.0))


def summarise(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int],
              grids: Mapping[str, Sequence[str]], *, with_retention: bool = False,
              samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """Per task: every tuned method's test metric over seeds, the comparisons and the claims.

    Args:
      rows: every row of the sweep (any settings and seeds; the base model as method "base").
      seeds: the seeds to summarise; ``seeds[0]`` chooses each method's setting.
      grids: ordered ``{method: [setting label, ...]}`` of the methods to report.
      with_retention: also summarise the design metric (harmonic mean of the task metric and
        retention): each method's ``with_retention_mean``/``_std`` and
        ``fft_minus_lora_with_retention``.
      samples, seed: of the bootstrap.

    Returns:
      ``{task: {"metric", "n_test", "seeds", "base_model", "methods", "best_of_fft_lora",
      "fft_minus_lora", "molf_minus_best", "molf_recipe_minus_best", "molfe_minus_lora",
      "molfe_minus_adalora", "fft_minus_lora_retention", "claims", "incomplete"}}``; a
      comparison is ``{"mean", "ci95": [low, high]}`` or None when a side is missing.
      ``best_of_fft_lora`` is the one of fft and lora with the higher mean validation metric.

    Example:
      >>> rows = [{"task": "med", "method": m, "label": "r", "seed": 0, "val": v, "test": v,
      ...          "n_test": 2, "test_cases": {"correct": c}}
      ...         for m, v, c in (("fft", 50.0, [1, 0]), ("lora", 0.0, [0, 0]))]
      >>> summarise(rows, [0], {"fft": ["r"], "lora": ["r"]}, samples=20)["med"]["fft_minus_lora"]
      {'mean': 50.0, 'ci95': [0.0, 100.0]}
    """
    _check_unique(rows)
    seeds = list(seeds)
    chosen = choose_settings(rows, grids, seed=seeds[0])
    incomplete = incomplete_sweeps(rows, grids, seed=seeds[0])
    by_key = {_key(r): r for r in rows}
    tasks: dict[str, Any] = {}
    for task in _ordered_tasks(rows):
        missing = {m: f"settings {labels} missing on seed {seeds[0]}"
                   for (t, m), labels in incomplete.items() if t == task}
        runs: dict[str, list[Mapping[str, Any]]] = {}
        for method in grids:
            label = chosen.get((task, method))
            if label is None:
                continue
            found = [by_key.get((task, method, label, s)) for s in seeds]
            if any(r is None for r in found):
                missing[method] = f"{label} missing on seeds " + str(
                    [s for s, r in zip(seeds, found) if r is None])
                continue
            runs[method] = found
        methods = {}
        for method, found in runs.items():
            tests = [float(r["test"]) for r in found]
            retention = [r.get("retention") for r in found]
            entry = {"setting": chosen[(task, method)], "test": [round(t, 2) for t in tests]}
            entry["mean"], entry["std"] = _mean_std(tests)
            entry["val"] = round(float(np.mean([r["val"] for r in found])), 2)
            entry["retention"] = (None if None in retention
                                  else [round(float(x), 2) for x in retention])
            entry["retention_mean"], entry["retention_std"] = _mean_std(retention)
            if with_retention and entry["retention"] is not None:
                entry["with_retention_mean"], entry["with_retention_std"] = _mean_std(
                    [metric_with_retention(t, x) for t, x in zip(tests, retention)])
            methods[method] = entry

        best = None
        if {"fft", "lora"} <= methods.keys():
            # The better of the two by validation (never test); ties: fft.
            best = max(("fft", "lora"), key=lambda m: methods[m]["val"])

        def compare(x, y, on="metric"):
            y = best if y == "best" else y
            if x not in runs or y not in runs:
                return None
            a, b = ([r["test_cases"] for r in runs[m]] for m in (x, y))
            if on != "metric" and any(RETAINED not in c for c in (*a, *b)):
                return None
            return paired_difference(task, a, b, on=on, samples=samples, seed=seed)

        base = [r for r in rows if r["task"] == task and r["method"] == "base"
                and r["seed"] in seeds]
        base_retention = [r.get("retention") for r in base]
        some = next(iter(runs.values()), None) or [r for r in rows if r["task"] == task]
        entry = {
            "metric": PRIMARY.get(task) or ("accuracy" if "correct" in some[0].get(
                "test_cases", {}) else "heldout_score"),
            "n_test": some[0].get("n_test"),
            "seeds": seeds,
            "base_model": None if not base else {
                "test": round(float(np.mean([r["test"] for r in base])), 2),
                "retention": None if None in base_retention
                else round(float(np.mean(base_retention)), 2)},
            "methods": methods,
            "best_of_fft_lora": best,
        }
        for name, x, y in COMPARISONS:
            entry[name] = compare(x, y)
        entry["fft_minus_lora_retention"] = compare("fft", "lora", on="retention")
        if with_retention:
            entry["fft_minus_lora_with_retention"] = compare("fft", "lora", on="with_retention")
        entry["claims"] = {claim: verdict(entry[comparison], at_least=threshold)
                           for claim, comparison, threshold in CLAIMS}
        entry["incomplete"] = missing
        tasks[task] = entry
    return tasks


# The routing study: variant -> (LoRA/FFT rate ratio, top-k, score) unless the row says
# otherwise. molf_recipe is the authors' quickstart the ratio and score variants change.
STUDY_VARIANTS = {"molf_recipe": (1, 1, "epd"), "molf": (1, 1, "epd"),
                  "molf_ratio3": (3, 1, "epd"), "molf_ratio10": (10, 1, "epd"),
                  "molf_pfn": (1, 1, "pfn"), "molf_score": (1, 1, None),
                  "molfe": (1, 2, "epd"), "molfe_top1": (1, 1, "epd")}


def study_table(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int],
                grids: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The routing study on the first seed: per task and routed variant, how often the counted
    expert (molf: the FFT expert; molfe: the rank-128 expert) was applied, overall and per
    projection type (% of module-steps), with the rate ratio, top-k, score and test metric.

    Tuned methods (molf, molfe, molfe_top1) appear at the setting chosen on validation.

    Example:
      >>> r = {"task": "fact", "method": "molf_pfn", "label": "recipe", "seed": 0, "test": 9.0,
      ...      "routing": {"expert": "fft", "share": 0.5,
      ...                  "share_by_projection": {"q_proj": [0.2, 0.4]}}}
      >>> study_table([r], [0], {})[0]["share_by_projection"]
      {'q_proj': 30.0}
    """
    first = seeds[0]
    chosen = choose_settings(rows, grids, seed=first)
    out = []
    for task in _ordered_tasks(rows):
        for name, (ratio, top_k, score) in STUDY_VARIANTS.items():
            found = [r for r in rows if (r["task"], r["method"], r["seed"]) == (task, name, first)
                     and (name not in grids or r["label"] == chosen.get((task, name)))]
            if len(found) != 1 or not found[0].get("routing"):
                continue
            r = found[0]

            def field(key, default):  # the row's resolved value, else its setting's, else ours
                return r.get(key) or (r.get("setting") or {}).get(key) or default

            if field("fft_lr", None) and field("lora_lr", None):
                ratio = field("lora_lr", None) / field("fft_lr", None)
            shares = r["routing"]["share_by_projection"]
            out.append({"task": task, "variant": name, "setting": r["label"],
                        "lr_ratio": f"{ratio:g}", "top_k": field("top_k", top_k),
                        "score": field("score", score), "test": round(float(r["test"]), 2),
                        "expert": r["routing"]["expert"],
                        "share": round(100 * float(r["routing"]["share"]), 1),
                        "share_by_projection": {p: round(100 * float(np.mean(v)), 1)
                                                for p, v in shares.items()}})
    return out
