"""molf_jax.experiments statistics and rendering, against small hand-computed examples.

Where an interval must be exact, the per-case differences are constant (every resample gives
the same difference) or the resample indices are given (``draws=``), so each figure below is
worked out by hand in its comment.
"""

import json

import numpy as np
import pytest

from molf_jax.experiments import (BEGIN, END, choose_settings, in_step, incomplete_sweeps,
                                  metric_of, metric_with_retention, paired_difference,
                                  percentile_interval, plot_study, render, retention_of, splice,
                                  study_table, summarise, verdict)

SAMPLES = 50  # the intervals pinned below are exact at any sample count


def row(task, method, label, seed, val, cases, retention=None, **extra):
    return {"task": task, "method": method, "label": label, "setting": {"label": label},
            "seed": seed, "val": val, "test": metric_of(task, cases),
            "n_test": len(next(iter(cases.values()))), "test_cases": cases,
            "retention": retention, **extra}


# --- metrics ---------------------------------------------------------------------------------

def test_task_metrics_and_the_retention_design_metric():
    assert metric_of("sql", {"correct": [1, 0, 0, 0], "retained": [1]}) == 25.0
    fact = {"paraphrase": [1.0, 0.5], "neighborhood": [0.2, 0.4], "efficacy": [1.0, 1.0]}
    # 2 / (1/0.75 + 1/0.3) = 0.428571...
    assert metric_of("fact", fact) == pytest.approx(42.857142857)
    assert metric_of("fact", {**fact, "neighborhood": [0.0, 0.0]}) == 0.0
    with pytest.raises(ValueError, match="task 'odd'.*'correct'"):
        metric_of("odd", {"retained": [1]})
    assert retention_of([1, 0, 1, 1]) == 75.0
    assert metric_with_retention(50.0, 100.0) == pytest.approx(200 / 3)  # 2 / (1/50 + 1/100)
    assert metric_with_retention(0.0, 100.0) == 0.0


# --- the bootstrap -----------------------------------------------------------------------------

def test_interval_is_the_2_5th_and_97_5th_percentile():
    # 41 values 0..40: the 2.5th percentile sits at position 0.025 * 40 = 1, the 97.5th at 39
    # (5th/95th would give 2 and 38).
    assert percentile_interval(np.arange(41.0)[::-1]) == (1.0, 39.0)


def test_paired_difference_with_given_draws_is_the_hand_computed_interval():
    # 40 cases; a is right on case 0 only, b never. Resample j (j = 0..40) takes case 0 j times
    # and case 39 the other 40 - j times, so its difference is 100 * j / 40 = 2.5 j points:
    # 0, 2.5, ..., 100. Percentile positions 1 and 39 of these 41 values: 2.5 and 97.5.
    a = {"correct": [1] + [0] * 39}
    b = {"correct": [0] * 40}
    draws = np.array([[0] * j + [39] * (40 - j) for j in range(41)])[np.random.permutation(41)]
    diff = paired_difference("med", [a], [b], draws={"cases": draws})
    assert diff == {"mean": 2.5, "ci95": [2.5, 97.5]}


def test_paired_resampling_keeps_each_case_with_its_pair():
    # b is a plus 0.1 on every case: every paired resample differs by exactly 10 points; an
    # unpaired one (independent indices for a and b) would spread over tens of points.
    a = np.random.default_rng(0).random(200)
    diff = paired_difference("sql", [{"correct": a + 0.1}], [{"correct": a}], samples=SAMPLES)
    assert diff == {"mean": 10.0, "ci95": [10.0, 10.0]}
    # Pooled over seeds: seed s's case i pairs with seed s's case i.
    diff = paired_difference("sql", [{"correct": a[:50] + 0.1}, {"correct": a[50:] + 0.1}],
                             [{"correct": a[:50]}, {"correct": a[50:]}], samples=SAMPLES)
    assert diff == {"mean": 10.0, "ci95": [10.0, 10.0]}
    with pytest.raises(ValueError, match="lengths"):
        paired_difference("sql", [{"correct": a}], [{"correct": a[:-1]}], samples=SAMPLES)


def test_retention_and_the_design_metric_resample_cases_and_facts_apart_but_paired():
    # Probe facts (3) and task cases (2) have different lengths: each group has its own indices.
    a = {"correct": [1, 1], "retained": [1, 0, 1]}
    b = {"correct": [1, 0], "retained": [1, 1, 1]}
    # Full sample: a 100 and 66.67 -> harmonic 80; b 50 and 100 -> 66.67; a - b = 13.33.
    assert paired_difference("med", [a], [b], on="with_retention", samples=SAMPLES)["mean"] \
        == 13.33
    # One resample: cases (0, 1), facts (1, 1, 1): a 100 and 0 -> 0; b 50 and 100 -> 66.67.
    one = {"cases": np.array([[0, 1]]), "retained": np.array([[1, 1, 1]])}
    assert paired_difference("med", [a], [b], on="with_retention", draws=one)["ci95"] == [
        -66.67, -66.67]
    # Retention alone: facts (0, 2, 2): a 100, b 100.
    facts = {"retained": np.array([[0, 2, 2]])}
    assert paired_difference("med", [a], [b], on="retention", draws=facts) == {
        "mean": -33.33, "ci95": [0.0, 0.0]}
    # The same facts on both sides, random draws: paired, every resample differs by nothing.
    same = {"correct": [1, 0], "retained": list(np.random.default_rng(1).integers(0, 2, 60))}
    assert paired_difference("med", [same], [same], on="with_retention", samples=SAMPLES)[
        "ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="'retained'"):
        paired_difference("med", [{"correct": [1]}], [{"correct": [0]}], on="retention")


@pytest.mark.parametrize("ci,at_least,expected", [
    ([0.01, 3.0], 0.0, "yes"), ([0.0, 3.0], 0.0, "inconclusive"),    # touching decides nothing
    ([-3.0, -0.01], 0.0, "no"), ([-3.0, 0.0], 0.0, "inconclusive"),
    ([-1.49, 0.2], -1.5, "yes"), ([-1.5, 0.2], -1.5, "inconclusive"),
    ([-4.0, -1.51], -1.5, "no"), ([-4.0, -1.5], -1.5, "inconclusive"),
    ([-1.0, 1.0], 0.0, "inconclusive")])
def test_verdict_thresholds(ci, at_least, expected):
    assert verdict({"mean": sum(ci) / 2, "ci95": ci}, at_least=at_least) == expected
    assert verdict(None, at_least=0.0) is None


# --- tuning --------------------------------------------------------------------------------

GRID = {"fft": ["1e-4", "5e-5", "2e-5"]}


def test_settings_are_chosen_on_the_first_seeds_validation_ties_to_the_grids_order():
    ok = {"correct": [1, 0]}
    best_test = {"correct": [1, 1]}
    rows = [row("med", "fft", "2e-5", 0, 60.0, ok),          # ties with 5e-5, listed later
            row("med", "fft", "1e-4", 0, 50.0, best_test),   # best on test, not on validation
            row("med", "fft", "5e-5", 0, 60.0, ok),
            row("med", "fft", "1e-4", 1, 99.0, ok),          # a later seed never chooses
            row("med", "fft", "9e-9", 0, 100.0, ok)]         # outside the grid: no candidate
    assert choose_settings(rows, GRID, seed=0) == {("med", "fft"): "5e-5"}
    assert choose_settings(rows, GRID, seed=1) == {}         # seed 1 has no whole sweep
    assert incomplete_sweeps(rows, GRID, seed=1) == {("med", "fft"): ["5e-5", "2e-5"]}


# --- the summary ----------------------------------------------------------------------------

def sweep_rows():
    """Two seeds, 20 cases each, every per-case difference constant so intervals are exact.

    molf is the reference x; fft = x + 0.05 (val 60), lora = x - 0.10 (val 40): fft is the
    better by validation and molf - fft = -5, molf - lora = +10. molf_recipe = fft (0);
    molfe = lora (0, touching the threshold); adalora = lora - 0.02 (molfe - adalora = +2).
    fft has a second setting, better on test and on seed 1's validation, worse on seed 0's.
    """
    rng = np.random.default_rng(3)
    grids = {"fft": ["good", "bad"], "lora": ["r"], "molf": ["r"], "molf_recipe": ["recipe"],
             "molfe": ["r"], "adalora": ["r"]}
    shift = {"fft": 0.05, "lora": -0.10, "molf": 0.0, "molf_recipe": 0.05, "molfe": -0.10,
             "adalora": -0.12}
    val = {"fft": 60.0, "lora": 40.0}
    retention = {"fft": (80.0, 70.0), "lora": (90.0, 100.0)}
    retained = {"fft": [0, 0, 0, 0], "lora": [1, 1, 1, 1]}
    rows = []
    for seed in (0, 1):
        x = 0.3 + 0.5 * rng.random(20)
        for method, grid in grids.items():
            cases = {"correct": x + shift[method]}
            if method in retained:
                cases["retained"] = retained[method]
            rows.append(row("sql", method, grid[0], seed, val.get(method, 50.0), cases,
                            retention=retention.get(method, (None, None))[seed]))
        rows.append(row("sql", "fft", "bad", seed, (10.0, 90.0)[seed], {"correct": x + 0.3}))
        rows.append(row("sql", "base", "base", seed, 0.0, {"correct": x * 0}, retention=100.0))
    # fft's first-seed test metrics: mean(x0) + 5 and mean(x1) + 5 points.
    return rows, grids


def test_summary_chooses_by_first_seed_validation_and_reports_sample_std():
    rows, grids = sweep_rows()
    task = summarise(rows, [0, 1], grids, samples=SAMPLES)["sql"]
    fft = task["methods"]["fft"]
    assert fft["setting"] == "good"       # "bad" wins on test and on seed 1's validation
    good = [r["test"] for r in rows if (r["method"], r["label"]) == ("fft", "good")]
    assert fft["test"] == [round(t, 2) for t in good]
    # Two seeds: std with ddof=1 is |t0 - t1| / sqrt(2) (ddof=0 would be |t0 - t1| / 2).
    assert fft["std"] == round(abs(good[0] - good[1]) / np.sqrt(2), 2) != 0
    assert fft["val"] == 60.0
    assert (fft["retention"], fft["retention_mean"], fft["retention_std"]) == (
        [80.0, 70.0], 75.0, 7.07)         # 10 / sqrt(2)
    assert task["methods"]["molf"]["retention_mean"] is None
    assert task["base_model"] == {"test": 0.0, "retention": 100.0}
    assert task["n_test"] == 20 and task["seeds"] == [0, 1] and task["metric"] == \
        "execution_accuracy"
    assert task["incomplete"] == {}


def test_summary_compares_with_the_better_of_fft_and_lora_and_judges_the_claims():
    rows, grids = sweep_rows()
    task = summarise(rows, [0, 1], grids, samples=SAMPLES)["sql"]
    assert task["best_of_fft_lora"] == "fft"                    # val 60 against 40
    assert task["fft_minus_lora"] == {"mean": 15.0, "ci95": [15.0, 15.0]}
    assert task["molf_minus_best"] == {"mean": -5.0, "ci95": [-5.0, -5.0]}   # not +10 (lora)
    assert task["molf_recipe_minus_best"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert task["molfe_minus_lora"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert task["molfe_minus_adalora"] == {"mean": 2.0, "ci95": [2.0, 2.0]}
    assert task["fft_minus_lora_retention"] == {"mean": -100.0, "ci95": [-100.0, -100.0]}
    assert task["claims"] == {"molf_within_1_5_of_best": "no",
                              "molf_recipe_within_1_5_of_best": "yes",
                              "molfe_beats_lora": "inconclusive",
                              "molfe_beats_adalora": "yes"}
    assert "fft_minus_lora_with_retention" not in task


def test_summary_with_retention_reports_the_design_metric():
    rows, grids = sweep_rows()
    task = summarise(rows, [0, 1], grids, samples=SAMPLES, with_retention=True)["sql"]
    fft = task["methods"]["fft"]
    by_seed = [metric_with_retention(t, r) for t, r in zip(fft["test"], (80.0, 70.0))]
    assert fft["with_retention_mean"] == pytest.approx(np.mean(by_seed), abs=0.01)
    # Pooled: fft retains no probe fact, so its design metric is 0; lora retains all of them.
    lora_metric = np.mean([r["test"] for r in rows if r["method"] == "lora"])
    expected = round(-metric_with_retention(lora_metric, 100.0), 2)
    comparison = task["fft_minus_lora_with_retention"]
    assert comparison["mean"] == expected
    assert comparison["ci95"][0] < expected < comparison["ci95"][1]  # lora's cases vary


def test_only_the_chosen_settings_seeds_enter_and_an_incomplete_method_is_named():
    rows, grids = sweep_rows()
    rows = [r for r in rows if not (r["method"] == "lora" and r["seed"] == 1)]
    rows = [r for r in rows if not (r["method"] == "fft" and r["label"] == "good"
                                    and r["seed"] == 1)]
    task = summarise(rows, [0, 1], grids, samples=SAMPLES)["sql"]
    # fft's chosen setting lacks seed 1: its other setting's seed 1 does not stand in.
    assert "fft" not in task["methods"] and "lora" not in task["methods"]
    assert task["incomplete"] == {"fft": "good missing on seeds [1]",
                                  "lora": "r missing on seeds [1]"}
    assert task["fft_minus_lora"] is None and task["claims"]["molf_within_1_5_of_best"] is None
    with pytest.raises(ValueError, match="two rows for task sql, method adalora, setting r, "
                                         "seed 1"):
        summarise(rows + [rows[-3]], [0, 1], grids, samples=SAMPLES)


def test_study_table_reads_the_first_seeds_chosen_routed_runs():
    routing = {"expert": "fft", "share": 0.25,
               "share_by_projection": {"q_proj": [0.0, 0.5], "down_proj": [1.0, 1.0]}}
    rows = [row("fact", "molf", "slow", 0, 10.0, {"correct": [1]}, routing=routing),
            row("fact", "molf", "fast", 0, 5.0, {"correct": [0]}, routing={**routing,
                                                                           "share": 0.9}),
            row("fact", "molf_ratio10", "recipe", 0, 0.0, {"correct": [1]}, routing=routing,
                fft_lr=5e-5, lora_lr=5e-4),
            row("fact", "molf_pfn", "recipe", 1, 0.0, {"correct": [1]}, routing=routing),
            row("fact", "molf_score", "score=mine", 0, 0.0, {"correct": [0]}, routing=routing)]
    rows[-1]["setting"] = {"mode": "molf", "score": "mine"}
    table = study_table(rows, [0, 1], {"molf": ["fast", "slow"]})
    assert [(s["variant"], s["setting"], s["lr_ratio"], s["share"]) for s in table] == [
        ("molf", "slow", "1", 25.0), ("molf_ratio10", "recipe", "10", 25.0),
        ("molf_score", "score=mine", "1", 25.0)]
    assert table[0]["share_by_projection"] == {"q_proj": 25.0, "down_proj": 100.0}
    assert (table[1]["top_k"], table[1]["score"], table[1]["test"]) == (1, "epd", 100.0)
    assert table[2]["score"] == "mine"        # the setting names the study's own score


# --- rendering --------------------------------------------------------------------------------

def results_json():
    rows, grids = sweep_rows()
    study = study_table([{**r, "routing": {"expert": "fft", "share": 0.5,
                                           "share_by_projection": {"k_proj": [0.8]}}}
                         for r in rows if r["method"] == "molf"], [0, 1], grids)
    results = {"tasks": summarise(rows, [0, 1], grids, samples=SAMPLES, with_retention=True),
               "study": study, "runs": len(rows), "device": "NVIDIA H100 80GB HBM3",
               "plan_wall_seconds": 612.4, "failed_runs": [],
               "command": "python scripts/reproduce.py"}
    return json.loads(json.dumps(results))  # as read back from results.json


def test_render_shows_every_table_the_issue_asks_for():
    text = render(results_json())
    assert text == render(results_json())  # deterministic
    for line in [
        "| sql (execution_accuracy, 20 x 2) | base model | - | 0.0 | 100.0 | - |",
        "| task | max(FFT, LoRA) | FFT - LoRA | MoLF (tuned) - max(FFT, LoRA) | "
        "MoLF (recipe) - max(FFT, LoRA) | MoLF-E - LoRA | MoLF-E - AdaLoRA |",
        "| sql | FFT | +15.0 [+15.0, +15.0] | -5.0 [-5.0, -5.0] | +0.0 [+0.0, +0.0] | "
        "+0.0 [+0.0, +0.0] | +2.0 [+2.0, +2.0] |",
        "| sql | no | yes | inconclusive | yes |",
        "| sql | molf | r | 1 | 1 | epd | ",
        "16 runs on NVIDIA H100 80GB HBM3; plan wall time 612 s; failed runs: none.",
    ]:
        assert line in text, line
    fft = results_json()["tasks"]["sql"]["methods"]["fft"]
    assert (f"| FFT | good | {fft['mean']:.1f} +- {fft['std']:.1f} | 75.0 +- 7.1 | "
            f"{fft['with_retention_mean']:.1f} +- ") in text
    assert "| sql | -100.0 [-100.0, -100.0] |" in text      # the retention comparisons
    failed = {**results_json(), "failed_runs": ["sql__fft__bad__s1", "med__lora__r__s0"]}
    assert "failed runs: sql__fft__bad__s1, med__lora__r__s0." in render(failed)
    broken = {k: v for k, v in results_json().items() if k != "plan_wall_seconds"}
    with pytest.raises(ValueError, match="'plan_wall_seconds'"):
        render(broken)


def test_study_plots_are_drawn_from_the_routing_logs(tmp_path):
    routing = {"expert": "fft", "share": 0.5, "steps": [1, 2],
               "share_by_projection": {"q_proj": [0.0, 0.5], "down_proj": [1.0, 1.0]}}
    rows = [row("fact", name, "recipe", 0, 0.0, {"correct": [1]}, routing=routing,
                fft_lr=5e-5, lora_lr=lr)
            for name, lr in (("molf_recipe", 5e-5), ("molf_ratio3", 1.5e-4))]
    results = {"tasks": {"fact": {"seeds": [0]}}, "study": study_table(rows, [0], {})}
    written = plot_study(results, rows, tmp_path)
    assert [p.name for p in written] == ["fft_share_fact.png", "rate_ratio.png"]
    assert all(p.stat().st_size > 0 for p in written)


def test_a_page_spliced_with_the_tables_is_in_step_until_the_results_change():
    results = results_json()
    page = f"# Results\n\nintro\n{BEGIN}\nstale\n{END}\n\nafter\n"
    assert not in_step(page, results)
    page = splice(page, render(results))
    assert in_step(page, results)
    assert page.startswith("# Results\n\nintro\n" + BEGIN) and page.endswith(END + "\n\nafter\n")
    assert splice(page, render(results)) == page            # idempotent
    results["tasks"]["sql"]["methods"]["fft"]["mean"] += 1
    assert not in_step(page, results)
    with pytest.raises(ValueError, match="exactly one"):
        in_step("no markers", results)
