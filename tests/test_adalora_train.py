"""The adalora training mode: trains, logs each module's kept rank, exports a merged folder and a
PEFT AdaLoRA adapter that agree, plots the ranks, and refuses bad schedules with exit status 2."""

import json
import shutil

import numpy as np
import peft
import pytest
import torch
import transformers

from molf_jax.cli import main as cli_main
from molf_jax.train import train
from molf_jax.train.export import load_run
from molf_jax.train.runlog import RunLog
from molf_jax.viz import plot_run
from tiny_run import tiny_config, tiny_hf_folder

# The tiny Qwen2 of tiny_run: D=32, F=64, L=2 layers, 4 heads, 2 kv heads, head width 8.
D, F, L, Q, KV = 32, 64, 2, 32, 16
INIT_R, TARGET_R, STEPS = 4, 2, 12
MODULES = L * 7


def triplet_count(r):
    # r * (in + out + 1) per target: q, k, v, o, gate, up, down.
    shapes = [(D, Q), (D, KV), (D, KV), (Q, D), (D, F), (D, F), (F, D)]
    return L * sum(r * (i + o + 1) for i, o in shapes)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adalora_run")
    model_dir = tiny_hf_folder(root / "tiny-qwen2")
    config = tiny_config(model_dir, root / "run", mode="adalora", steps=STEPS, init_r=INIT_R,
                         target_r=TARGET_R, tinit=2, tfinal=3, delta_t=2, export=True)
    return model_dir, root / "run", train(config)


def test_adalora_trains_its_triplets_only(run):
    _, run_dir, summary = run
    assert summary.trainable_params == triplet_count(INIT_R)
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    losses = [r["loss"] for r in rows]
    assert len(losses) == STEPS and np.mean(losses[-2:]) < losses[0] - 0.05, losses
    assert all(r["orth_reg"] > 0 for r in rows)


def test_rank_log_follows_the_budget(run):
    _, run_dir, _ = run
    table = json.load(open(run_dir / "rank_modules.json"))
    assert len(table["modules"]) == MODULES and table["init_r"] == INIT_R
    assert "layers/1/mlp/down_proj" in table["modules"]
    rows = [json.loads(line) for line in open(run_dir / "ranks.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    totals = [sum(r["ranks"]) for r in rows]
    assert totals[0] == MODULES * INIT_R  # nothing pruned up to tinit
    assert totals[-1] == rows[-1]["budget"] == MODULES * TARGET_R
    assert all(a >= b for a, b in zip(totals, totals[1:])), totals
    # The final pattern is the one the run's checkpoint holds.
    pattern = load_run(run_dir).rank_pattern  # scanned: {"layers/mlp/up_proj": [L, r]}
    kept = {path.replace("layers/", f"layers/{layer}/", 1): int(mask[layer].sum())
            for path, mask in pattern.items() for layer in range(L)}
    assert kept == dict(zip(table["modules"], rows[-1]["ranks"]))


def test_resume_cuts_the_rank_log_back_with_the_other_step_logs(run, tmp_path):
    _, run_dir, _ = run
    shutil.copy(run_dir / "ranks.jsonl", tmp_path / "ranks.jsonl")
    RunLog(tmp_path, resume_step=5).close()
    rows = [json.loads(line) for line in open(tmp_path / "ranks.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_peft_adapter_and_merged_folder_agree(run):
    model_dir, run_dir, summary = run
    ids = torch.tensor(np.random.RandomState(0).randint(3, 200, (2, 10)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "merged",
                                                               dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base.eval(), run_dir / "adapter").eval()
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        got = adapted(input_ids=ids).logits
    assert torch.max(torch.abs(got - expected)) <= 1e-4 * torch.max(torch.abs(expected))
    config = json.load(open(run_dir / "adapter" / "adapter_config.json"))
    kept = sum(sum(mask) for mask in config["rank_pattern"].values())
    assert config["peft_type"] == "ADALORA" and kept == MODULES * TARGET_R
    assert summary.adapter_dir == str(run_dir / "adapter")


def test_plot_draws_the_ranks(run):
    _, run_dir, _ = run
    names = {p.name for p in plot_run(run_dir)}
    assert "adalora_ranks.png" in names and "loss.png" in names


@pytest.mark.parametrize("flags,message", [
    (["--target-r", "20"], "target-r must be between 0 and init-r"),
    (["--delta-t", "0"], "delta-t must be >= 1"),
    (["--beta2", "1.0"], "beta2 must be in [0, 1)"),
    (["--steps", "5", "--tinit", "3", "--tfinal", "2"], "no budgeting phase"),
    (["--lora-ranks", "8"], "not --lora-ranks"),
])
def test_bad_adalora_settings_give_a_message_and_status(capsys, flags, message):
    status = cli_main(["train", "--mode", "adalora", *flags])
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err
