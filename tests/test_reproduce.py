"""The reproduction: choosing by validation, the claim checks, the tables (molf_jax.experiments);
planning and a whole tiny run (scripts/reproduce.py)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molf_jax import experiments
from tiny_run import tiny_hf_folder

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


reproduce = load_script("reproduce")


def row(task, method, setting, seed, val, cases):
    return {"task": task, "method": method, "setting": setting,
            "label": reproduce.setting_label(setting), "seed": seed, "val": val,
            "test": experiments.metric_of(task, cases), "test_cases": cases, "n_test": 4,
            "size": {}, "device": "cpu"}


FFT = reproduce.METHODS["fft"]      # the authors' sweep: 1e-4, 5e-5, 2e-5
LORA = reproduce.METHODS["lora"]    # 5e-4, 5e-5
# The sweeps as ordered grids of setting labels (what molf_jax.experiments tunes over).
GRIDS = {"fft": ["fft_lr=0.0001", "fft_lr=5e-05", "fft_lr=2e-05"],
         "lora": ["lora_lr=0.0005", "lora_lr=5e-05"], "molf": ["recipe"], "molfe": ["recipe"],
         "molfe_top1": ["top_k=1"], "molf_gate": ["recipe"], "adalora": ["recipe"]}


def test_rates_are_chosen_on_the_first_seeds_validation_then_the_order_of_the_sweep():
    ok = {"correct": [1, 0, 1, 0]}
    rows = [row("med", "fft", FFT[0], 0, 50.0, ok), row("med", "fft", FFT[1], 0, 60.0, ok),
            row("med", "fft", FFT[2], 0, 60.0, ok),   # tie with 5e-5: the earlier one wins
            row("med", "fft", FFT[2], 1, 99.0, ok),   # another seed never chooses
            row("med", "lora", LORA[1], 0, 70.0, ok), row("med", "lora", LORA[0], 0, 20.0, ok)]
    chosen = experiments.choose_settings(rows, GRIDS, seed=0)
    assert chosen == {("med", "fft"): "fft_lr=5e-05", ("med", "lora"): "lora_lr=5e-05"}


def test_later_seeds_wait_for_the_first_seeds_sweep_and_use_its_choice():
    plan = reproduce.Plan(tasks=("med",), methods=("fft", "molf"), seeds=(0, 1), model="m",
                          preset="smoke", study=False)
    names = {j.name for j in reproduce.planned_jobs(plan, [])}
    assert "med__molf__recipe__s1" in names                   # one setting: no wait
    assert not any(n.startswith("med__fft") and n.endswith("s1") for n in names)
    ok = {"correct": [1, 1, 0, 0]}
    rows = [row("med", "fft", s, 0, v, ok) for s, v in zip(FFT, (10.0, 30.0, 20.0))]
    names = {j.name for j in reproduce.planned_jobs(plan, rows)}
    assert {n for n in names if n.startswith("med__fft") and n.endswith("s1")} == {
        "med__fft__fft_lr=5e-05__s1"}


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
            for setting in reproduce.METHODS[method]:
                rows.append(row("sql", method, setting, seed, 50.0, {"correct": correct}))
    task = experiments.summarise(rows, [0, 1], GRIDS, samples=200)["sql"]
    assert task["seeds"] == [0, 1] and task["n_test"] == 4
    assert set(task["methods"]) == set(reproduce.METHODS)
    assert task["methods"]["fft"]["setting"] == "fft_lr=0.0001"  # all tie: the first
    for key in ("fft_minus_lora", "molf_minus_best", "molfe_minus_lora"):
        assert set(task[key]) == {"mean", "ci95"}
    assert task["molfe_minus_adalora"] is None      # no adalora runs
    assert task["fft_minus_lora"]["ci95"][0] > 0    # fft is right everywhere
    assert task["claims"]["molfe_beats_lora"] == "no"
    assert task["claims"]["molfe_beats_adalora"] is None


def test_adalora_is_planned_and_compared_with_molfe():
    plan = reproduce.Plan(tasks=("med",), methods=tuple(reproduce.methods_available()),
                          seeds=(0,), model="m", preset="smoke", study=False)
    assert "med__adalora__recipe__s0" in {j.name for j in reproduce.planned_jobs(plan, [])}
    rows = [row("med", "molfe", {"mode": "molfe"}, 0, 50.0, {"correct": np.ones(40, int)}),
            row("med", "adalora", {"mode": "adalora"}, 0, 50.0, {"correct": np.zeros(40, int)})]
    task = experiments.summarise(rows, [0], GRIDS, samples=200)["med"]
    assert task["molfe_minus_adalora"]["mean"] == 100.0
    assert task["claims"]["molfe_beats_adalora"] == "yes"


def test_every_real_task_holds_out_at_least_400_test_cases():
    from molf_jax.data import load_task

    for task, size in reproduce.PRESETS["h200"].items():  # issue 17: >= 400 per task
        extra = {"eval_size": size.eval_size} if size.eval_size else {}
        records = load_task(task, "offline", size=size.task_size, seed=0, **extra).eval
        test = len(records) - size.val if size.test is None else size.test
        assert len(records) >= size.val + test and test >= 400, (task, len(records))


def test_readme_speed_tables_are_the_scripts_output(capsys):
    """The README's speed tables are pasted output, never typed by hand."""
    readme = (ROOT / "README.md").read_text()

    def block(marker):
        start = readme.index(f"<!-- {marker} -->") + len(f"<!-- {marker} -->")
        return readme[start:readme.index("<!-- end -->", start)].strip()

    bench_table = load_script("bench_table")
    for section, marker in (("speed", ""), ("memory-model", " --memory-model"),
                            ("trainer", " --trainer")):
        bench_table.main(section=section)
        assert block(f"python scripts/bench_table.py{marker}") == \
            capsys.readouterr().out.strip(), section


def test_a_reproduction_table_in_the_readme_is_the_rendering_of_results_json():
    """When the README shows reproduction tables (between experiments.BEGIN and END), they
    are experiments.render of the committed results.json; until the sweep has results, the
    README shows none."""
    readme = (ROOT / "README.md").read_text()
    results = ROOT / "reproduce_results" / "results.json"
    assert (experiments.BEGIN in readme) == results.exists()
    if results.exists():
        assert experiments.in_step(readme, json.loads(results.read_text()))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model = tiny_hf_folder(tmp_path_factory.mktemp("model") / "tiny-qwen2")
    out = tmp_path_factory.mktemp("reproduce")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--model", str(model),
         "--preset", "smoke", "--tasks", "fact", "--methods", "fft", "lora", "molf",
         "--single-rate", "--seeds", "0", "1", "--no-study", "--workers", "2",
         "--out-dir", str(out)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_a_tiny_reproduction_runs_end_to_end(tiny_run):
    out, stdout = tiny_run
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(p.read_text()) for p in (out / "rows").glob("*.json")]
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("base", 0), ("fft", 0), ("fft", 1), ("lora", 0), ("lora", 1), ("molf", 0), ("molf", 1)]
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
    tables = reproduce.render(results)
    assert tables in stdout
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--render",
                            "--out-dir", str(out)], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == tables.strip()
