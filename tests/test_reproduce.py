"""The reproduction (molf_jax.experiments): choosing by validation, the claim checks, the plan's
programs, the docs page in step with results.json, and a whole tiny run of scripts/reproduce.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molf_jax import experiments
from tiny_run import tiny_hf_folder

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reproduction.md"


def row(task, method, rates, seed, val, cases):
    return {"task": task, "method": method, "setting": rates,
            "label": experiments.setting_label(rates), "seed": seed, "val": val,
            "test": experiments.metric_of(task, cases), "test_cases": cases, "n_test": 4,
            "device": "cpu"}


FFT = experiments.GRIDS["fft"][1]    # the authors' sweep: 1e-4, 5e-5, 2e-5
LORA = experiments.GRIDS["lora"][1]  # 5e-4, 5e-5
GRIDS = experiments.grid_labels()


def test_rates_are_chosen_on_the_first_seeds_validation_then_the_order_of_the_sweep():
    ok = {"correct": [1, 0, 1, 0]}
    rows = [row("med", "fft", FFT[0], 0, 50.0, ok), row("med", "fft", FFT[1], 0, 60.0, ok),
            row("med", "fft", FFT[2], 0, 60.0, ok),   # tie with 5e-5: the earlier one wins
            row("med", "fft", FFT[2], 1, 99.0, ok),   # another seed never chooses
            row("med", "lora", LORA[1], 0, 70.0, ok), row("med", "lora", LORA[0], 0, 20.0, ok)]
    chosen = experiments.choose_settings(rows, GRIDS, seed=0)
    assert chosen == {("med", "fft"): "fft_lr=5e-05", ("med", "lora"): "lora_lr=5e-05"}


def test_every_setting_runs_on_every_seed_in_one_program_per_mode_configuration():
    plan = experiments.Plan(tasks=("med",), methods=("fft", "molf", "molf_recipe", "molfe",
                                                     "molfe_top1"), seeds=(0, 1))
    programs = {p.name: p for p in experiments.programs(plan, "med")}
    assert set(programs) == {"med__fft", "med__molf", "med__molfe", "med__molfe__top_k1",
                             "med__molf__pfn", "med__molf__score"}
    fft = programs["med__fft"]
    assert sorted((m.seed, m.fft_lr) for m in fft.members) == sorted(
        (seed, r["fft_lr"]) for r in FFT for seed in (0, 1))
    molf = programs["med__molf"]
    # The recipe (5e-5, equal rates) is one of molf's grid members: one run serves both rows;
    # the study's rate ratios (3 and 10) join on the first seed only.
    recipe = experiments.Member(1, 5e-5, 5e-5)
    assert ("molf_recipe", "fft_lr=5e-05,lora_lr=5e-05") in molf.methods[
        molf.members.index(recipe)]
    assert ("molf", "fft_lr=5e-05,lora_lr=5e-05") in molf.methods[molf.members.index(recipe)]
    ratios = [m for m in molf.members if m.lora_lr != m.fft_lr]
    assert sorted((m.seed, round(m.lora_lr / m.fft_lr, 6)) for m in ratios) == [(0, 3), (0, 10)]
    assert len(molf.members) == 3 * 2 + 2
    assert programs["med__molfe__top_k1"].settings == {"mode": "molfe", "top_k": 1}
    assert [m.seed for m in programs["med__molf__pfn"].members] == [0]


def test_paired_bootstrap_interval_of_a_difference():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 400)
    better = np.where(rng.random(400) < 0.3, 1, base)   # right wherever base is, and more
    same = experiments.paired_difference("med", [{"correct": base}], [{"correct": base}])
    assert same == {"mean": 0.0, "ci95": [0.0, 0.0]}
    diff = experiments.paired_difference("med", [{"correct": better}], [{"correct": base}])
    expected = 100 * (better.mean() - base.mean())
    assert diff["mean"] == pytest.approx(expected, abs=0.01)
    low, high = diff["ci95"]
    assert 0 < low < expected < high
    # Paired: the interval is that of the per-case differences, narrower than unpaired.
    assert high - low < 2 * 1.96 * 100 * np.sqrt(better.var() / 400 + base.var() / 400)
    assert experiments.verdict(diff, at_least=0.0) == "yes"
    assert experiments.verdict({"mean": -3, "ci95": [-5, -1]}, at_least=0.0) == "no"
    assert experiments.verdict({"mean": 1, "ci95": [-1, 3]}, at_least=0.0) == "inconclusive"
    assert experiments.verdict({"mean": -1, "ci95": [-1.4, 0.2]}, at_least=-1.5) == "yes"


def test_fact_metric_is_the_harmonic_mean_of_the_held_out_scores():
    cases = {"paraphrase": [1.0, 0.5], "neighborhood": [0.2, 0.4], "efficacy": [1.0, 1.0]}
    assert experiments.metric_of("fact", cases) == pytest.approx(100 * 2 / (1 / 0.75 + 1 / 0.3))
    assert experiments.metric_of("fact", {**cases, "neighborhood": [0.0, 0.0]}) == 0.0
    assert experiments.metric_of("sql", {"correct": [1, 0, 0, 0]}) == 25.0


def test_summary_compares_the_chosen_runs_over_seeds_with_the_issues_fields():
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1):
        truth = rng.integers(0, 2, 50)
        runs = {"fft": np.ones(50, int), "lora": truth, "molf": truth,
                "molfe": np.zeros(50, int), "molfe_top1": truth, "molf_gate": truth}
        for method, correct in runs.items():
            for rates in experiments.GRIDS[method][1]:
                rows.append(row("sql", method, rates, seed, 50.0, {"correct": correct}))
    task = experiments.summarise(rows, [0, 1], GRIDS, samples=200)["sql"]
    assert task["seeds"] == [0, 1] and task["n_test"] == 4
    assert set(task["methods"]) == set(runs)
    assert task["methods"]["fft"]["setting"] == "fft_lr=0.0001"  # all tie: the first
    for key in ("fft_minus_lora", "molf_minus_best", "molfe_minus_lora"):
        assert set(task[key]) == {"mean", "ci95"}
    assert task["molfe_minus_adalora"] is None      # no adalora runs
    assert task["fft_minus_lora"]["ci95"][0] > 0    # fft is right everywhere
    assert task["claims"]["molfe_beats_lora"] == "no"
    assert task["claims"]["molfe_beats_adalora"] is None


def test_adalora_is_planned_and_compared_with_molfe():
    plan = experiments.Plan(tasks=("med",), methods=tuple(experiments.GRIDS), seeds=(0,),
                            study=False)
    names = [p.name for p in experiments.programs(plan, "med")]
    assert "med__adalora" in names
    rows = [row("med", method, rates, 0, 50.0, {"correct": np.full(40, right)})
            for method, right in (("molfe", 1), ("adalora", 0))
            for rates in experiments.GRIDS[method][1]]
    task = experiments.summarise(rows, [0], GRIDS, samples=200)["med"]
    assert task["molfe_minus_adalora"]["mean"] == 100.0
    assert task["claims"]["molfe_beats_adalora"] == "yes"


def test_every_real_task_holds_out_at_least_400_test_cases():
    from molf_jax.data import load_task

    for task, size in experiments.PRESETS["gpu"].items():  # issue 17: >= 400 per task
        extra = {"eval_size": size.eval_size} if size.eval_size else {}
        records = load_task(task, "offline", size=size.task_size, seed=0,
                            offline_options=dict(size.offline_options) or None, **extra).eval
        test = len(records) - size.val if size.test is None else size.test
        assert len(records) >= size.val + test and test >= 400, (task, len(records))


def test_the_reproduction_page_is_the_rendering_of_the_committed_results():
    """docs/reproduction.md shows the tables (between experiments.BEGIN and END) rendered from
    the committed reproduce_results/results.json, and no other numbers of its own there."""
    results = ROOT / "reproduce_results" / "results.json"
    page = PAGE.read_text()
    assert (experiments.BEGIN in page) == results.exists()
    if results.exists():
        assert experiments.in_step(page, json.loads(results.read_text()))


def test_the_readme_shows_the_summary_rendered_from_the_committed_results():
    results = json.loads((ROOT / "reproduce_results" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert experiments.in_step(readme, results, summary=True)
    # The summary carries every task's FFT - LoRA interval and the run's wall time.
    for task in results["tasks"].values():
        comparison = task["fft_minus_lora"]
        assert f"{comparison['mean']:+.1f} [{comparison['ci95'][0]:+.1f}" in readme
    assert f"plan wall time {results['plan_wall_seconds']:.0f} s" in readme


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model = tiny_hf_folder(tmp_path_factory.mktemp("model") / "tiny-qwen2")
    out = tmp_path_factory.mktemp("reproduce")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--model", str(model),
         "--preset", "smoke", "--tasks", "fact", "--methods", "fft", "lora", "molf",
         "--seeds", "0", "1", "--no-study", "--steps", "2", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, model


def test_a_tiny_reproduction_runs_end_to_end(tiny_run):
    out, stdout, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    # Every rate of every grid on the first seed, and the base; on the second seed only the
    # setting the first seed's validation chose.
    chosen = experiments.choose_settings(rows, GRIDS, seed=0)
    assert sorted((r["method"], r["label"], r["seed"]) for r in rows) == sorted(
        [("base", "base", 0)] + [(m, label, 0) for m in ("fft", "lora", "molf")
                                 for label in GRIDS[m]]
        + [(m, chosen[("fact", m)], 1) for m in ("fft", "lora", "molf")])
    # Two phases of one compilation: the first seed's settings, then only the chosen one on
    # the second seed (padded to the program's width, never scored).
    for method, width in (("fft", 3), ("lora", 2), ("molf", 3)):
        timing = results["timings"]["programs"][f"fact__{method}"]
        assert (timing["members"], timing["chunks"], timing["scored"]) == (
            width + 1, [width, 1], width + 1)
        assert list(timing["compile_seconds"]) == [f"{width}/none"]
        # The timeline: compiled before it started, started before it finished.
        assert 0 <= timing["compiled_at"] <= timing["started_at"] + timing[
            "compile_wait_seconds"] + 0.1 and timing["started_at"] < timing["finished_at"]
    # timings.json, rewritten after each program, holds the run's last state (a run stopped
    # before results.json still shows where its time went).
    assert json.loads((out / "timings.json").read_text()) == results["timings"]
    trained = [r for r in rows if r["method"] != "base"]
    # Same examples in the same order within a seed: the same steps and tokens per seed.
    for seed in (0, 1):
        assert len({(r["steps"], r["tokens"]) for r in trained if r["seed"] == seed}) == 1
    fact = results["tasks"]["fact"]
    assert fact["seeds"] == [0, 1] and fact["n_test"] == 4
    assert set(fact["methods"]) == {"fft", "lora", "molf"}
    assert all(len(m["test"]) == 2 for m in fact["methods"].values())
    assert set(fact["fft_minus_lora"]) == {"mean", "ci95"}
    molf = next(r for r in rows if r["method"] == "molf" and r["seed"] == 0)
    assert set(molf["routing"]["share_by_projection"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (out / "plots" / "fft_share_fact.png").stat().st_size > 0
    assert results["failed_runs"] == [] and results["plan_wall_seconds"] > 0
    assert results["runs"] == len(rows) and results["device"] == "cpu"
    tables = experiments.render(results)
    assert tables in stdout
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--render",
                            "--out-dir", str(out)], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == tables.strip()


def test_programs_compiled_in_worker_processes_are_loaded_to_the_same_rows(tiny_run, tmp_path):
    """--compile-processes: each program compiles in a worker process and the runner loads its
    executables; every row is the threads' row."""
    reference, _, model = tiny_run
    out = tmp_path / "workers"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--model", str(model),
         "--preset", "smoke", "--tasks", "fact", "--methods", "fft", "molf",
         "--seeds", "0", "1", "--no-study", "--steps", "2", "--compile-processes", "1",
         "--out-dir", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "worker compile failed" not in done.stdout + done.stderr
    timings = json.loads((out / "results.json").read_text())["timings"]
    for method in ("fft", "molf"):
        program = timings["programs"][f"fact__{method}"]
        assert list(program["worker_compile_seconds"]) == ["3/none"]
        assert program["compiled_by"] == {"3/none": "worker"}
    want = {p.name: json.loads(p.read_text()) for p in (reference / "rows").glob("*.json")
            if "__lora__" not in p.name}
    got = {p.name: json.loads(p.read_text()) for p in (out / "rows").glob("*.json")}
    assert sorted(got) == sorted(want)
    for name, row in want.items():
        assert got[name]["test_cases"] == row["test_cases"]
        if "train_loss" in row:
            assert got[name]["train_loss"] == pytest.approx(row["train_loss"], rel=1e-6)


def test_a_program_too_large_for_the_device_runs_in_equal_chunks_with_the_same_rows(tmp_path,
                                                                                     monkeypatch):
    """Three fft members where two fit: chunks of 2 and 1 (padded to 2, one compilation), the
    padding never scored, and every row equal to the run made in one piece."""
    from molf_jax.experiments.runner import Runner

    model = tiny_hf_folder(tmp_path / "model")
    plan = experiments.Plan(("fact",), ("fft",), (0,), preset="smoke", study=False)

    def rows_of(out, fits, remat="none", nice=0):
        if fits is not None:
            monkeypatch.setattr(Runner, "_fits", fits)
        runner = Runner(str(model), out, compute_dtype="float32", retention=False, remat=remat,
                        compile_nice=nice)
        rows = [r for r in runner.run(plan, steps=2) if r["method"] == "fft"]
        return runner.timings["programs"]["fact__fft"], {r["label"]: r for r in rows}

    whole, expected = rows_of(tmp_path / "whole", None, nice=3)
    split, got = rows_of(tmp_path / "split", lambda self, program: program.num_members <= 2)
    assert whole["chunks"] == [3] and split["chunks"] == [2, 1]
    # --compile-nice: the compile threads yield the CPUs (the main thread keeps its priority).
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert whole["compile_thread_nice"] == min(19, base + 3)
    assert split["compile_thread_nice"] == base == os.getpriority(os.PRIO_PROCESS, 0)
    assert sorted(split["compile_seconds"]) == ["2/none", "3/none"] and split["scored"] == 3
    assert sorted(got) == sorted(GRIDS["fft"])
    for label, row in expected.items():
        assert got[label]["test_cases"].keys() == row["test_cases"].keys()
        for part, cases in row["test_cases"].items():
            assert got[label]["test_cases"][part] == pytest.approx(cases, abs=1e-6)
        assert got[label]["train_loss"] == pytest.approx(row["train_loss"], rel=1e-5)
    # Remat candidates: the members stay whole with the first candidate that fits.
    whole_remat, got = rows_of(tmp_path / "remat",
                               lambda self, program: program.config.remat == "full",
                               remat=("none", "full"))
    assert whole_remat["chunks"] == [3] and whole_remat["remat"] == "full"
    assert sorted(whole_remat["compile_seconds"]) == ["3/full", "3/none"]
    for label, row in expected.items():
        assert got[label]["train_loss"] == pytest.approx(row["train_loss"], rel=1e-5)
    # A task that names its candidates is never compiled with the others.
    import dataclasses

    smoke = dict(experiments.PRESETS["smoke"])
    smoke["fact"] = dataclasses.replace(smoke["fact"], remat=("full",))
    monkeypatch.setitem(experiments.PRESETS, "smoke", smoke)
    only_full, _ = rows_of(tmp_path / "task_remat", lambda self, program: True,
                           remat=("none", "full"))
    assert list(only_full["compile_seconds"]) == ["3/full"] and only_full["remat"] == "full"
    # The task's XLA options reach the compiler: an unknown one fails the compilation ahead,
    # and the chunk compiles for itself (without them) to the same rows.
    smoke["fact"] = dataclasses.replace(smoke["fact"], compiler_options=(("no_such_option", 1),))
    unknown, got = rows_of(tmp_path / "options", None)
    assert "compile_seconds" not in unknown and unknown["chunks"] == [3]
    for label, row in expected.items():
        assert got[label]["train_loss"] == pytest.approx(row["train_loss"], rel=1e-5)


def test_sql_accuracy_is_split_into_the_query_kinds_training_saw_and_those_it_never_saw():
    from molf_jax.experiments.breakdown import held_out_flags, sql_by_kind

    flags = held_out_flags("gpu", 0)
    assert flags is not None and 0 < flags.sum() < len(flags) == 400
    assert held_out_flags("smoke", 0) is None  # the smoke preset holds out no kind
    rows = [{"task": "sql", "method": "fft", "label": "a", "seed": 0,
             "test_cases": {"correct": [float(not f) for f in flags]}},
            {"task": "sql", "method": "lora", "label": "b", "seed": 0,
             "test_cases": {"correct": [float(f) for f in flags[:-1]] + [0.0]}}]
    summary = {"seeds": [0], "methods": {"fft": {"setting": "a"}, "lora": {"setting": "b"}}}
    split = sql_by_kind(summary, rows, "gpu")
    held = int(flags.sum())
    assert (split["n_trained_kinds"], split["n_held_out_kinds"]) == (400 - held, held)
    assert split["methods"]["fft"] == {"trained_kinds": 100.0, "held_out_kinds": 0.0}
    last = 1.0 if flags[-1] else 0.0  # lora's last case is wrong, whatever its kind
    assert split["methods"]["lora"]["trained_kinds"] == 0.0
    assert split["methods"]["lora"]["held_out_kinds"] == round(100 * (held - last) / held, 2)
