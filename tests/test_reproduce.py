"""scripts/reproduce.py: choosing by validation, the claim checks, the tables, a whole tiny run."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_run import tiny_hf_folder

ROOT = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


reproduce = load_script("reproduce")


def row(task, method, scale, val, test, loss=1.0):
    metric = reproduce.PRIMARY[task]
    return {"task": task, "method": method, "lr_scale": scale, "val": {metric: val},
            "test": {metric: test}, "train_loss": loss, "peak_memory_gib": 1.0,
            "train_seconds": 2.0, "size": {"test": 10}}


def test_choice_uses_validation_then_loss_then_smaller_scale():
    rows = [row("med", "base", None, 0.9, 0.9),
            row("med", "fft", 0.3, 0.50, 0.99),   # best test, worse validation: not chosen
            row("med", "fft", 1.0, 0.60, 0.40),
            row("med", "lora", 1.0, 0.70, 0.50, loss=2.0),
            row("med", "lora", 3.0, 0.70, 0.60, loss=1.0),   # same val, lower loss
            row("med", "molf", 0.3, 0.55, 0.45),
            row("med", "molf", 1.0, 0.55, 0.47)]              # full tie: smaller scale wins
    chosen = reproduce.choose(rows)
    assert set(chosen) == {("med", "fft"), ("med", "lora"), ("med", "molf")}
    assert chosen[("med", "fft")]["lr_scale"] == 1.0
    assert chosen[("med", "lora")]["lr_scale"] == 3.0
    assert chosen[("med", "molf")]["lr_scale"] == 0.3


def test_claims_compare_test_metrics_with_a_1_5_point_margin():
    chosen = reproduce.choose([
        row("sql", "fft", 1.0, 0.5, 0.800), row("sql", "lora", 1.0, 0.5, 0.700),
        row("sql", "molf", 1.0, 0.5, 0.786), row("sql", "molfe", 1.0, 0.5, 0.690),
        row("fact", "fft", 1.0, 0.5, 0.600), row("fact", "lora", 1.0, 0.5, 0.650),
        row("fact", "molf", 1.0, 0.5, 0.630), row("fact", "molfe", 1.0, 0.5, 0.660)])
    by_task = {c["task"]: c for c in reproduce.claims(chosen)}
    assert set(by_task) == {"sql", "fact"}
    assert by_task["sql"]["molf_within_1_5_points"] is True       # 1.4 points below FFT
    assert math.isclose(by_task["sql"]["molf_minus_best_of_fft_lora"], -0.014)
    assert by_task["sql"]["molfe_beats_lora"] is False
    assert by_task["fact"]["molf_within_1_5_points"] is False     # 2 points below LoRA
    assert by_task["fact"]["molfe_beats_lora"] is True


def test_fact_score_is_the_harmonic_mean_of_its_three_parts():
    parts = {"efficacy_score": 0.9, "paraphrase_score": 0.6, "neighborhood_score": 0.3}
    out = reproduce.primary_metrics("fact", parts)
    assert math.isclose(out["fact_score"], 3 / (1 / 0.9 + 1 / 0.6 + 1 / 0.3))
    assert reproduce.primary_metrics("fact", {**parts, "efficacy_score": 0.0})["fact_score"] == 0
    assert "fact_score" not in reproduce.primary_metrics("med", {"accuracy": 0.5})


def test_readme_tables_are_the_scripts_output(capsys):
    """The README's reproduction and speed tables are pasted output, never typed by hand."""
    readme = (ROOT / "README.md").read_text()

    def block(marker):
        start = readme.index(f"<!-- {marker} -->") + len(f"<!-- {marker} -->")
        return readme[start:readme.index("<!-- end -->", start)].strip()

    results = json.loads((ROOT / "reproduce_results" / "results.json").read_text())
    assert block("python scripts/reproduce.py --render") == reproduce.render(results).strip()
    bench_table = load_script("bench_table")
    for section, marker in (("speed", ""), ("memory-model", " --memory-model"),
                            ("trainer", " --trainer")):
        bench_table.main(section=section)
        assert block(f"python scripts/bench_table.py{marker}") == \
            capsys.readouterr().out.strip(), section


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    model = tiny_hf_folder(tmp_path_factory.mktemp("model") / "tiny-qwen2")
    out = tmp_path_factory.mktemp("reproduce")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--model", str(model),
         "--preset", "smoke", "--tasks", "fact", "--methods", "fft", "lora", "molf",
         "--lr-scales", "1", "--workers", "2", "--out-dir", str(out), "--check-repeat"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_a_tiny_reproduction_runs_end_to_end_and_repeats_exactly(tiny_run):
    out, stdout = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["lr_scale"]) for r in results["rows"]) == [
        ("base", None), ("fft", 1.0), ("lora", 1.0), ("molf", 1.0)]
    trained = [r for r in results["rows"] if r["method"] != "base"]
    # Same token budget: every method saw the same number of steps and tokens.
    assert len({(r["steps"], r["tokens"]) for r in trained}) == 1
    assert {c["method"] for c in results["chosen"]} == {"fft", "lora", "molf"}
    assert results["claims"][0]["task"] == "fact"
    assert "molf_within_1_5_points" in results["claims"][0]
    # The repeat is a separate process from scratch; its metrics must be bit-identical.
    assert results["repeat_check"]["identical"] is True
    assert results["repeat_check"]["first"] == results["repeat_check"]["second"]
    assert (out / "plots" / "fact_molf" / "routing_heatmap.png").stat().st_size > 0
    tables = reproduce.render(results)
    assert tables in stdout
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--render",
                            "--out-dir", str(out)], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == tables.strip()
