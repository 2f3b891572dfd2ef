"""The run directory as a user relies on it: nothing lost after a kill, nothing written over a
model, one message for every bad input.

The kill test runs the CLI in subprocesses that SIGKILL themselves right after logging a chosen
step (so the kill lands at that step whatever the machine's load), with a persistent XLA cache
shared by all of them, so only the first process compiles.
"""

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from molf_jax.checkpoints import default_model
from molf_jax.checkpoints.folders import EXPORT_MARKER
from molf_jax.checkpoints.default_model import CacheError, MARKER_FILE, default_model_dir
from molf_jax.cli import main as cli_main
from molf_jax.train import RunCheckpointer
from tiny_run import final_params, tiny_hf_folder

STEPS, SAVE_EVERY, KILLS = 12, 2, 5

# Runs the CLI; with MOLF_TEST_KILL_AT=k the process sends itself MOLF_TEST_SIGNAL (SIGKILL
# unless named) right after writing the metrics row of step k (inside the loop, before that
# step's checkpoint when one is due). SIGINT gets Python's default handler, as in a terminal: a
# shell without job control starts background jobs with SIGINT ignored, and the CLI inherits it.
_LAUNCHER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from molf_jax.train import runlog
kill_at = int(os.environ.get("MOLF_TEST_KILL_AT", "0"))
kill_with = getattr(signal, os.environ.get("MOLF_TEST_SIGNAL", "SIGKILL"))
write = runlog.RunLog.metrics
def metrics(self, row):
    write(self, row)
    if row["step"] == kill_at:
        os.kill(os.getpid(), kill_with)
runlog.RunLog.metrics = metrics
from molf_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def common_args(model_dir):
    return ["--model", str(model_dir), "--mode", "molf", "--lora-ranks", "4", "--task", "fact",
            "--task-size", "8", "--batch-size", "4", "--max-length", "96", "--mesh", "fsdp=1",
            "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--no-eval",
            "--lora-dropout", "0.1", "--grad-accum", "2", "--keep-checkpoints", "2",
            "--save-every-minutes", "0"]


def launch(args, env, kill_at=0, signal_name="SIGKILL"):
    env = dict(env, MOLF_TEST_KILL_AT=str(kill_at), MOLF_TEST_SIGNAL=signal_name)
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, "train", *args], env=env,
                          capture_output=True, text=True, timeout=900)
    return done.returncode, done.stderr + done.stdout


def steps_logged(run_dir, name):
    return [json.loads(line)["step"] for line in open(run_dir / name)]


def assert_bitwise_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and the same run killed at KILLS random steps and resumed."""
    root = tmp_path_factory.mktemp("reliability")
    model_dir = tiny_hf_folder(root / "tiny-qwen2")
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(root / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    status, out = launch(common_args(model_dir) + ["--out-dir", str(root / "whole"),
                                                   "--no-export"], env)
    assert status == 0, out
    seed = random.randrange(10**6)
    kill_steps = sorted(random.Random(seed).sample(range(1, STEPS), KILLS))
    killed, outputs = root / "killed", []
    for number, step in enumerate(kill_steps):
        resume = ["--resume"] if number else []
        status, out = launch(common_args(model_dir) + ["--out-dir", str(killed), "--no-export",
                                                       *resume], env, kill_at=step)
        assert status == -9, (seed, kill_steps, step, out)
        outputs.append(out)
    status, out = launch(common_args(model_dir) + ["--out-dir", str(killed), "--resume"], env)
    assert status == 0, out
    outputs.append(out)
    return dict(root=root, model=model_dir, env=env, whole=root / "whole", killed=killed,
                kill_steps=kill_steps, seed=seed, outputs=outputs)


def test_killed_five_times_then_resumed_equals_the_uninterrupted_run(runs):
    whole, killed, context = runs["whole"], runs["killed"], (runs["seed"], runs["kill_steps"])
    step_a, a = final_params(whole)
    step_b, b = final_params(killed)
    assert step_a == step_b == STEPS
    assert_bitwise_equal(a, b)
    for name in ("metrics.jsonl", "routing.jsonl"):
        assert steps_logged(killed, name) == list(range(1, STEPS + 1)), (name, context)
    rows = {p: [json.loads(line) for line in open(p / "metrics.jsonl")] for p in (whole, killed)}
    assert [r["loss"] for r in rows[killed]] == [r["loss"] for r in rows[whole]]
    # Each resume starts from a checkpoint at most two saves before the kill (the step's own
    # checkpoint comes after its log row; the one before may still be committing).
    for kill, out in zip(runs["kill_steps"], runs["outputs"][1:]):
        found = re.search(rf"resuming {killed} at step (\d+)", out)
        if found is None:  # killed before its first checkpoint
            assert "no finished checkpoint; starting the run again from step 0" in out, out
        start = int(found.group(1)) if found else 0
        assert start % SAVE_EVERY == 0 and kill - 2 * SAVE_EVERY <= start <= kill, (context, out)
    summaries = [json.loads((p / "summary.json").read_text()) for p in (whole, killed)]
    assert summaries[1]["tokens"] == summaries[0]["tokens"]  # the whole run, not the last part
    assert summaries[1]["final_loss"] == summaries[0]["final_loss"]


def test_ctrl_c_right_after_a_checkpoint_then_resume_loses_no_step(runs, tmp_path):
    run_dir, args = tmp_path / "run", common_args(runs["model"]) + ["--no-export"]
    # Step SAVE_EVERY + 1 is logged after the step-SAVE_EVERY checkpoint was handed to orbax.
    status, out = launch(args + ["--out-dir", str(run_dir)], runs["env"],
                         kill_at=SAVE_EVERY + 1, signal_name="SIGINT")
    assert status == 130 and out.strip().splitlines()[-1] == "interrupted", out
    assert "Traceback" not in out, out
    status, out = launch(args + ["--out-dir", str(run_dir), "--resume"], runs["env"])
    assert status == 0, out
    assert f"resuming {run_dir} at step {SAVE_EVERY}" in out  # the interrupted save committed
    for name in ("metrics.jsonl", "routing.jsonl"):
        assert steps_logged(run_dir, name) == list(range(1, STEPS + 1)), name
    assert_bitwise_equal(final_params(run_dir)[1], final_params(runs["whole"])[1])


def test_a_fresh_run_never_appends_to_an_earlier_runs_logs(runs, capsys, tmp_path):
    run_dir = tmp_path / "half"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    status = cli_main(["train", *common_args(runs["model"]), "--out-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2 and "holds an earlier run (metrics.jsonl)" in err and "--resume" in err
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["killed"], run_dir)
    latest = run_dir / "checkpoints" / str(STEPS)
    truncate_largest_file(latest)
    status, out = launch(common_args(runs["model"]) + ["--out-dir", str(run_dir), "--resume",
                                                       "--no-export"], runs["env"])
    assert status == 0, out
    older = STEPS - SAVE_EVERY
    assert f"checkpoint {latest} does not restore" in out and f"trying step {older}" in out
    assert f"resuming {run_dir} at step {older}" in out
    assert "Traceback" not in out and "Exception ignored" not in out, out
    assert_bitwise_equal(final_params(run_dir)[1], final_params(runs["whole"])[1])
    assert steps_logged(run_dir, "metrics.jsonl") == list(range(1, STEPS + 1))


def truncate_largest_file(folder):
    biggest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)


def test_damage_is_found_by_reading_the_step_before_orbax_restores_it(runs, tmp_path):
    # Orbax's own restore would find it too, but its concurrent reads echo "Event loop is
    # closed" from tensorstore threads after the first failure; this read happens first.
    run_dir = tmp_path / "run"
    shutil.copytree(runs["killed"], run_dir)
    latest = run_dir / "checkpoints" / str(STEPS)
    checkpointer = RunCheckpointer(run_dir, async_save=False)
    try:
        assert checkpointer._unreadable(STEPS) is None
        # Every data file of the step's stores cut in half: the largest file alone was at times
        # one no stored value is read from (CI, once in three runs), and the read found nothing.
        for data in [p for p in latest.rglob("*") if p.is_file() and p.parent.name == "d"]:
            with open(data, "r+b") as f:
                f.truncate(data.stat().st_size // 2)
        why = checkpointer._unreadable(STEPS)
        assert why is not None and str(latest) in why, why
        assert checkpointer._unreadable(STEPS - SAVE_EVERY) is None
    finally:
        checkpointer.close()


def test_no_checkpoint_that_restores_is_one_error(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["killed"], run_dir)
    for data in (run_dir / "checkpoints").glob("*/params/ocdbt.process_0/d/*"):
        data.write_bytes(b"")
    status = cli_main(["train", *common_args(runs["model"]), "--out-dir", str(run_dir),
                       "--resume"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().splitlines()[-1].startswith(
        "molf-jax train: error: --resume: no checkpoint in")
    assert err.count("does not restore") == 2  # one line per damaged checkpoint, then the error
    assert "Traceback" not in err and "Exception ignored" not in err


def folder_hash(folder):
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def test_export_never_writes_over_a_model_it_did_not_write(runs, tmp_path, capsys):
    run_dir, base = runs["killed"], runs["model"]
    before = folder_hash(base)
    status = cli_main(["export", str(run_dir), "--merged", str(base), "--overwrite"])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "device memory:" not in line]  # first line
    assert status == 2 and "the run's base model" in err and len(said) == 1
    assert folder_hash(base) == before

    cache = tmp_path / "cache"
    shutil.copytree(base, cache)
    (cache / MARKER_FILE).write_text("{}")
    status = cli_main(["export", str(run_dir), "--merged", str(cache), "--overwrite"])
    assert status == 2 and "embedded model's cache" in capsys.readouterr().err

    foreign = tmp_path / "someone_elses_model"
    shutil.copytree(base, foreign)
    (foreign / EXPORT_MARKER).unlink()  # the tiny base was itself written by save_hf
    before = folder_hash(foreign)
    status = cli_main(["export", str(run_dir), "--merged", str(foreign)])
    assert status == 2 and "--overwrite" in capsys.readouterr().err
    assert folder_hash(foreign) == before
    assert cli_main(["export", str(run_dir), "--merged", str(foreign), "--overwrite"]) == 0
    exported = folder_hash(foreign)
    assert exported != before and json.loads((foreign / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    # An export replaces its own earlier export without --overwrite.
    assert cli_main(["export", str(run_dir), "--merged", str(foreign)]) == 0
    assert folder_hash(foreign) == exported


def fake_cache(root):
    """A cache folder as default_model_dir leaves it (marker with the files' sizes)."""
    from safetensors.numpy import save_file

    folder = root / default_model.DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gemma3_text"}')
    save_file({"w": np.ones((4, 4), np.float32)}, str(folder / "model.safetensors"))
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    (folder / MARKER_FILE).write_text(json.dumps({"sizes": sizes}))
    return folder


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "config.json").write_text(""), "config.json: Expecting value"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 8), "model.safetensors has 8 bytes"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
])
def test_a_damaged_cache_says_how_to_rebuild_it(tmp_path, damage, message):
    folder = fake_cache(tmp_path)
    assert default_model_dir(tmp_path) == folder
    damage(folder)
    with pytest.raises(CacheError, match="damaged") as error:
        default_model_dir(tmp_path)
    assert message in str(error.value) and f"rm -r {folder}" in str(error.value)


def fact_rows(path, rows):
    path.write_text("".join(json.dumps({"requested_rewrite": r}) + "\n" for r in rows))
    return path


REWRITE = {"prompt": "{} was born in", "subject": "Ada", "target_new": {"str": "Paris"},
           "target_true": {"str": "London"}}


@pytest.fixture
def bad_inputs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "weights.pt").write_bytes(b"\x80\x02")
    (tmp_path / "notgguf.gguf").write_bytes(b"\x80not gguf")
    fact_rows(tmp_path / "no_target.jsonl",
              [REWRITE, {k: v for k, v in REWRITE.items() if k != "target_new"}])
    fact_rows(tmp_path / "no_braces.jsonl", [REWRITE, {**REWRITE, "prompt": "Ada was born in"}])
    (tmp_path / "broken.jsonl").write_text(json.dumps({"requested_rewrite": REWRITE}) + "\n{oops\n")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    model = tiny_hf_folder(tmp_path / "model")
    return tmp_path, model


def _eval(model, *more):
    return ["eval", "--model", str(model), "--task", "fact", *more]


BAD_INPUTS = [
    (lambda t, m: ["train", "--out-dir", str(t / "a_file")], "exists and is not a folder"),
    (lambda t, m: ["train", "--out-dir", str(t / "a_file" / "run")], "cannot write there"),
    (lambda t, m: ["plot", str(t), "--out", str(t / "a_file")], "exists and is not a folder"),
    (lambda t, m: _eval(t / "weights.pt"), "is a file; give a Hugging Face folder"),
    (lambda t, m: _eval(t / "notgguf.gguf"), "a GGUF file: convert it first"),
    (lambda t, m: _eval(m, "--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (lambda t, m: _eval(m, "--source", str(t / "no_target.jsonl")),
     "row 2: missing field requested_rewrite.target_new"),
    (lambda t, m: _eval(m, "--source", str(t / "broken.jsonl")), "line 2 is not valid JSON"),
    (lambda t, m: _eval(m, "--results", str(t / "x.txt")), "must be .csv or .jsonl"),
    (lambda t, m: _eval(m, "--results", str(t / "other.csv")), "header ['a', 'b'] is not"),
    (lambda t, m: ["train", "--model", str(m), "--source", str(t / "no_braces.jsonl"),
                   "--out-dir", str(t / "run")], "has no '{}' where the subject goes"),
]


@pytest.mark.parametrize("make_args,message", BAD_INPUTS)
def test_every_bad_input_is_one_line_and_exit_status_2(bad_inputs, capsys, make_args, message):
    status = cli_main(make_args(*bad_inputs))
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    # One error line (train may first state its numerics, an information line, after the
    # device-memory note every train, eval and export starts with).
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "device memory:" not in line]) <= 2, err


def test_the_python_api_checks_what_the_cli_checks():
    from molf_jax import label_lora_experts, molf_adamw

    with pytest.raises(ValueError, match="fft_learning_rate must be >= 0, got -1.0"):
        molf_adamw(label_lora_experts, fft_learning_rate=-1.0, lora_learning_rate=1e-4)
    with pytest.raises(ValueError, match="lora_weight_decay must be >= 0"):
        molf_adamw(label_lora_experts, fft_learning_rate=1e-4, lora_learning_rate=1e-4,
                   lora_weight_decay=-0.1)
