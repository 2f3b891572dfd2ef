"""What ``molf-jax train`` writes, from one tiny MoLF-E run of a Gemma 3 model through the CLI
entry point: the routing log against the optimizer state, metrics against the summary and the
TensorBoard events, evaluation before and after, and the exports read back by transformers and
peft, which ``molf-jax export`` reproduces byte for byte."""

import contextlib
import io
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from tensorboardX.proto import event_pb2
from tiny_run import tiny_hf_folder

from molf_jax import models
from molf_jax.cli import main as cli_main
from molf_jax.routing import MolfRouteState
from molf_jax.train import load_run
from molf_jax.train import setup as train_setup

STEPS = 5
FACT_METRICS = {"efficacy_score", "paraphrase_score", "neighborhood_score"}


def route_winners(opt_state) -> np.ndarray:
    (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
        x, MolfRouteState)) if isinstance(s, MolfRouteState)]
    return np.asarray(state.winners)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Trains, then exports again into other folders. Meanwhile it records, outside the loop's
    own read-back, the winners in the optimizer state returned by every step."""
    root = tmp_path_factory.mktemp("cli_run")
    model_dir = tiny_hf_folder(root / "tiny-gemma3", family="gemma3")
    run_dir = root / "run"
    winners = []
    jit_step = train_setup.jit_train_step  # the trainer jits its step in training_step

    def recording_jit(step_fn, params, opt_state):
        step = jit_step(step_fn, params, opt_state)

        def recorded(*args):
            out = step(*args)
            winners.append(route_winners(out[1]))
            return out

        return recorded

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        patch.setattr(train_setup, "jit_train_step", recording_jit)
        status = cli_main([
            "train", "--model", str(model_dir), "--mode", "molfe", "--lora-ranks", "2", "8",
            "--top-k", "1", "--lora-alpha", "16",  # a scale at which the winners change
            "--task", "fact", "--task-size", "8", "--batch-size", "4",
            "--steps", str(STEPS), "--max-length", "96", "--mesh", "fsdp=1",
            "--lora-lr", "3e-2", "--warmup-ratio", "0", "--schedule", "constant",
            "--lora-dropout", "0", "--eval-limit", "2", "--tensorboard",
            "--out-dir", str(run_dir)])
    assert status == 0, stderr.getvalue()
    again = root / "again"
    with contextlib.redirect_stdout(io.StringIO()):
        status = cli_main(["export", str(run_dir), "--merged", str(again / "merged"),
                           "--adapter", str(again / "adapter")])
    assert status == 0
    return dict(model_dir=model_dir, run_dir=run_dir, again=again, winners=winners,
                stdout=stdout.getvalue())


def jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_routing_log_holds_the_optimizer_states_winners_of_each_step(run):
    rows = jsonl(run["run_dir"] / "routing.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert len(run["winners"]) == STEPS
    for row, state_winners in zip(rows, run["winners"]):
        np.testing.assert_array_equal(np.asarray(row["winners"], bool), state_winners,
                                      err_msg=f"step {row['step']}")
    # Routing changes from step to step, so a log one step off cannot match.
    assert any((a != b).any() for a, b in zip(run["winners"], run["winners"][1:]))
    # Both experts (columns 1 and 2; molfe has no FFT column 0) won somewhere, so both carry
    # trained, non-zero b factors that an export must not drop.
    table = json.loads((run["run_dir"] / "routing_modules.json").read_text())
    columns = np.asarray(table["valid"]).any(axis=0)
    assert columns.tolist() == [False, True, True]
    assert np.stack(run["winners"]).any(axis=(0, 1)).tolist() == columns.tolist()


def test_summary_agrees_with_metrics_and_reports_evaluation_before_and_after(run):
    rows = jsonl(run["run_dir"] / "metrics.jsonl")
    summary = json.loads((run["run_dir"] / "summary.json").read_text())
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and summary["steps"] == STEPS
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"], rel=1e-6)
    assert summary["skipped_steps"] == rows[-1]["skipped"] == 0
    assert summary["mode"] == "molfe"
    assert set(summary["eval_before"]) == set(summary["eval_after"]) >= FACT_METRICS
    for name in FACT_METRICS:
        before, after = summary["eval_before"][name], summary["eval_after"][name]
        assert 0 <= before <= 1 and 0 <= after <= 1
        assert f"{name}: {before:.4f} -> {after:.4f}" in run["stdout"]
    assert summary["merged_dir"] == str(run["run_dir"] / "merged")
    assert summary["adapter_dir"] == str(run["run_dir"] / "adapter")


def tensorboard_scalars(folder):
    """{tag: {step: value}} from the TFRecord event files (length, crc, event, crc)."""
    scalars = {}
    for path in folder.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_events_carry_the_logged_metrics(run):
    rows = jsonl(run["run_dir"] / "metrics.jsonl")
    scalars = tensorboard_scalars(run["run_dir"] / "tensorboard")
    for key in ("loss", "lr_lora", "grad_norm"):
        assert sorted(scalars[key]) == [r["step"] for r in rows], key
        np.testing.assert_allclose([scalars[key][r["step"]] for r in rows],
                                   [r[key] for r in rows], rtol=1e-6, err_msg=key)


def padded_batch():
    ids = np.random.default_rng(0).integers(4, 200, (2, 12))
    mask = np.ones_like(ids)
    mask[1, -5:] = 0
    return ids * mask, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
                     ).logits.float().numpy()


def test_merged_folder_and_adapter_give_the_trained_flax_models_logits(run):
    trained = load_run(run["run_dir"])
    ids, mask = padded_batch()
    model = models.build_model(trained.model_config, lora=trained.lora,
                               scan_layers=trained.config.scan_layers)
    ours = np.asarray(model.apply({"params": trained.params}, jnp.asarray(ids),
                                  jnp.asarray(mask)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        run["run_dir"] / "merged", dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(
        run["model_dir"], dtype=torch.float32).eval()
    untrained = torch_logits(base, ids, mask)
    adapted = peft.PeftModel.from_pretrained(base, run["run_dir"] / "adapter").eval()
    real = mask.astype(bool)
    for name, logits in (("merged", torch_logits(merged, ids, mask)),
                         ("adapter", torch_logits(adapted, ids, mask))):
        np.testing.assert_allclose(logits[real], ours[real], rtol=1e-4, atol=1e-4,
                                   err_msg=name)
    assert np.abs(ours[real] - untrained[real]).max() > 1e-2  # training moved the logits


def test_export_command_reproduces_the_runs_folders_byte_for_byte(run):
    for folder in ("merged", "adapter"):
        original, again = run["run_dir"] / folder, run["again"] / folder
        names = sorted(p.name for p in original.iterdir())
        assert names == sorted(p.name for p in again.iterdir()) and names
        for name in names:
            assert (original / name).read_bytes() == (again / name).read_bytes(), name
