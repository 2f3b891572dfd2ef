"""The contention bench runs each condition against the same work and reports progress, the
host's responsiveness and the CPUs' use (a tiny model on the CPU; the numbers are the GPU's)."""

import json

from molf_jax.benchmarks.contention import cpu_busy_share, main
from tiny_run import tiny_hf_folder


def test_cpu_busy_share_counts_all_but_idle_and_iowait():
    # user nice system idle iowait irq softirq
    before = [100, 0, 50, 800, 50, 0, 0]
    after = [160, 0, 70, 860, 60, 0, 0]  # +60 user, +20 system, +60 idle, +10 iowait
    assert cpu_busy_share(before, after) == round(80 / 150, 3)
    assert cpu_busy_share(before, before) is None


def test_each_condition_reports_the_works_progress_and_the_hosts_lateness(tmp_path):
    model = tiny_hf_folder(tmp_path / "model")
    out = tmp_path / "contention.json"
    main(["--model", str(model), "--preset", "smoke", "--work", "fact",
          "--compile-tasks", "med", "--conditions", "alone", "lower_only", "compile_nice",
          "--threads", "1", "--seconds", "0.5", "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["conditions"]) == ["alone", "lower_only", "compile_nice"]
    for name, condition in report["conditions"].items():
        assert condition["fact"]["steps"] >= 4 and condition["fact"]["steps"] % 4 == 0
        assert condition["host"]["wakeups"] > 0
        assert 0 <= condition["cpu_busy"] <= 1
    assert report["conditions"]["alone"]["builds_finished"] == 0
    assert report["conditions"]["lower_only"]["builds_finished"] >= 1
    assert report["conditions"]["compile_nice"]["builds_finished"] >= 1
