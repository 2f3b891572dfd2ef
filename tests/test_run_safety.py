"""A hostile user's run directory (issue 26): nothing outside the run is written, no code is run
from a run's data, one writer at a time, corruption found, every bad value one line and exit 2.

Each test does what the user did and checks what the user would see: the outside files' hashes,
the exit status and the one error line, the files left in the folder.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from molf_jax.checkpoints import default_model
from molf_jax.checkpoints.default_model import CacheError, MARKER_FILE, default_model_dir
from molf_jax.cli import main as cli_main
from molf_jax.run_dir import RunDir, RunLock
from molf_jax.train.checkpoint import value_checksums
from tiny_run import final_params, tiny_hf_folder

STEPS = 4


def train_args(model, out_dir, *more):
    return ["train", "--model", str(model), "--mode", "molf", "--lora-ranks", "4",
            "--task-size", "8", "--batch-size", "4", "--max-length", "96", "--mesh", "fsdp=1",
            "--steps", str(STEPS), "--save-every", "2", "--save-every-minutes", "0",
            "--no-eval", "--no-export", "--out-dir", str(out_dir), *more]


def cli(capsys, *args):
    """(exit status, stderr lines) of ``molf-jax ARGS`` run in this process."""
    status = cli_main([str(a) for a in args])
    return status, capsys.readouterr().err.strip().splitlines()


def one_error(status, lines, *fragments):
    """Exit 2 and exactly one error line, holding every fragment; no traceback."""
    errors = [line for line in lines if "error:" in line]
    assert status == 2 and len(errors) == 1, lines
    assert all(f in errors[0] for f in fragments), errors[0]
    assert not any("Traceback" in line for line in lines), lines


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_hf_folder(tmp_path_factory.mktemp("safety") / "tiny-qwen2")


@pytest.fixture(scope="module")
def finished(model, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert cli_main(train_args(model, run_dir)) == 0
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir, symlinks=True)
    return run_dir


@pytest.fixture
def outside(tmp_path):
    """A folder of the user's own files, and their hashes."""
    folder = tmp_path / "outside"
    folder.mkdir()
    for name in ("config.txt", "table.txt", "log.txt", "loss.png", "weights.bin"):
        (folder / name).write_text(f"the user's {name}\n")
    return folder, {p.name: sha(p) for p in folder.iterdir()}


def unchanged(outside):
    folder, hashes = outside
    return {p.name: sha(p) for p in folder.iterdir()} == hashes


# --- 1-5: files outside the run, code from a run's data -------------------------------------

@pytest.mark.parametrize("entry,target", [
    ("run_config.json", "config.txt"), ("routing_modules.json", "table.txt"),
    ("metrics.jsonl", "log.txt"), ("merged", "."),
])
def test_row1_a_symlinked_entry_is_refused_before_training(model, tmp_path, capsys, outside,
                                                           entry, target):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / entry).symlink_to(outside[0] / target)
    status, lines = cli(capsys, *train_args(model, run_dir))
    one_error(status, lines, str(run_dir / entry), "symbolic link")
    assert unchanged(outside)
    assert sorted(p.name for p in run_dir.iterdir()) == [entry]  # nothing trained or written
    assert not any("optimizer steps" in line for line in lines)  # stopped before training


def test_row2_a_symlinked_plots_folder_or_png_is_refused(run_copy, capsys, outside):
    plots = run_copy / "plots"
    plots.symlink_to(outside[0])
    status, lines = cli(capsys, "plot", run_copy)
    one_error(status, lines, str(plots), "symbolic link")
    plots.unlink()
    plots.mkdir()
    (plots / "loss.png").symlink_to(outside[0] / "loss.png")
    status, lines = cli(capsys, "plot", run_copy)
    one_error(status, lines, str(plots / "loss.png"), "symbolic link")
    assert unchanged(outside)


def test_row3_a_planted_temporary_name_is_never_followed(model, run_copy, capsys, outside):
    (run_copy / "metrics.jsonl.tmp").symlink_to(outside[0] / "log.txt")
    with open(run_copy / "metrics.jsonl", "a") as f:  # a row past the checkpoint: the resume
        f.write(json.dumps({"step": STEPS + 1, "loss": 1.0}) + "\n")  # cuts it
    status, lines = cli(capsys, *train_args(model, run_copy, "--resume"))
    assert status == 0, lines
    assert unchanged(outside)
    metrics = run_copy / "metrics.jsonl"
    assert not metrics.is_symlink()
    assert [json.loads(line)["step"] for line in metrics.open()] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_row4_an_index_naming_a_file_outside_the_folder_is_refused(model, tmp_path, capsys,
                                                                   shard):
    from safetensors import safe_open

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    os.replace(folder / "model.safetensors", tmp_path / "outside.safetensors")
    with safe_open(str(tmp_path / "outside.safetensors"), framework="np") as f:
        names = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {name: shard for name in names}}))
    status, lines = cli(capsys, *train_args(folder, tmp_path / "run"))
    one_error(status, lines, "model.safetensors.index.json", repr(shard),
              "a shard must be a file inside the folder")


def test_row5_a_run_directory_names_no_code_that_is_imported(run_copy, tmp_path):
    config = json.loads((run_copy / "run_config.json").read_text())
    (run_copy / "run_config.json").write_text(json.dumps({**config, "score": "evilscore:S"}))
    marker = tmp_path / "ran"
    (tmp_path / "evilscore.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    done = subprocess.run([sys.executable, "-m", "molf_jax.cli", "export", str(run_copy)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and not marker.exists(), done.stderr
    assert "custom routing score 'evilscore:S'" in done.stderr
    # One line besides the first, which says how much of the GPU JAX may take (issue 25).
    said = [line for line in done.stderr.strip().splitlines() if "device memory:" not in line]
    assert "--score evilscore:S" in done.stderr and len(said) == 1


# --- 6-11: another writer, the user's own files ---------------------------------------------

_HOLDER = """
import sys
from molf_jax.run_dir import RunLock
RunLock(sys.argv[1], "train").acquire()
print("held", flush=True)
sys.stdin.read()
"""


def test_row6_a_second_writer_is_refused_and_a_dead_writers_lock_taken_over(
        model, run_copy, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_copy)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p.name: sha(p) for p in run_copy.iterdir() if p.is_file()}
        for args in (train_args(model, run_copy, "--resume"), ["export", run_copy]):
            status, lines = cli(capsys, *args)
            one_error(status, lines, f"(process {holder.pid} on", "is writing this run "
                      "directory")
        assert {p.name: sha(p) for p in run_copy.iterdir() if p.is_file()} == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert RunDir(run_copy).lock.is_file()  # what a killed writer leaves
    status, lines = cli(capsys, *train_args(model, run_copy, "--resume"))
    assert status == 0, lines
    assert any(f"taking over the lock left by molf-jax train (process {holder.pid})" in line
               for line in lines), lines
    assert not RunDir(run_copy).lock.exists()  # released at the end


def test_row6_the_lock_is_one_writer_per_directory():
    # Two locks on one folder in one process conflict as two processes do (flock is per open).
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        with RunLock(folder, "train"):
            with pytest.raises(ValueError, match="is writing this run directory"):
                RunLock(folder, "export").acquire()
        with RunLock(folder, "export"):  # free again once released
            pass


def test_row7_a_folder_of_someone_elses_files_is_refused_before_anything_is_written(
        model, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "routing_modules.json").write_text('{"my": "own table"}')
    (folder / "notes.txt").write_text("mine")
    before = {p.name: sha(p) for p in folder.iterdir()}
    status, lines = cli(capsys, *train_args(model, folder))
    one_error(status, lines, f"--out-dir {folder}: holds an earlier run", "--resume")
    assert {p.name: sha(p) for p in folder.iterdir()} == before
    (folder / "routing_modules.json").unlink()
    status, lines = cli(capsys, *train_args(model, folder))
    one_error(status, lines, "holds files molf_jax did not write (notes.txt)", "new or empty")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("keep", ["0", "-1"])
def test_row8_every_run_keeps_a_checkpoint(model, tmp_path, capsys, keep):
    status, lines = cli(capsys, *train_args(model, tmp_path / "run", "--keep-checkpoints", keep))
    one_error(status, lines, f"--keep-checkpoints must be at least 1, got {keep}")
    assert not (tmp_path / "run").exists()


def test_row9_an_empty_out_dir_is_refused(model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, lines = cli(capsys, *train_args(model, ""))
    one_error(status, lines, "--out-dir is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_row10_resuming_for_another_step_count_is_refused_unless_asked(model, run_copy,
                                                                       capsys):
    config = sha(run_copy / "run_config.json")
    more = ["--steps", str(STEPS + 2)]
    status, lines = cli(capsys, *train_args(model, run_copy, "--resume"), *more)
    one_error(status, lines, f"started for {STEPS} optimizer steps", f"asks for {STEPS + 2}",
              "--reschedule")
    assert sha(run_copy / "run_config.json") == config
    status, lines = cli(capsys, *train_args(model, run_copy, "--resume", "--reschedule"), *more)
    assert status == 0, lines
    assert any(f"rebuilt for {STEPS + 2} steps (the run was started for {STEPS})" in line
               for line in lines), lines
    assert json.loads((run_copy / "run_config.json").read_text())["steps"] == STEPS + 2
    assert final_params(run_copy)[0] == STEPS + 2


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_row11_an_export_killed_half_way_leaves_nothing_behind(run_copy, capsys):
    host = socket.gethostname()
    abandoned = run_copy / f".merged.tmp-{host}-{_dead_pid()}-abc123"
    live = run_copy / f".merged.tmp-{host}-{os.getpid()}-def456"  # an export writing now
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    status, lines = cli(capsys, "export", run_copy)
    assert status == 0, lines
    assert not abandoned.exists() and live.is_dir()
    assert (run_copy / "merged" / "config.json").is_file()


# --- 12-13: corruption ----------------------------------------------------------------------

def flip_bytes(path, count, seed=0):
    """Inverts ``count`` bytes in the middle of ``path`` (the size stays)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - count // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_row12_flipped_bytes_in_the_newest_checkpoint_are_found_and_it_is_set_aside(
        model, run_copy, capsys):
    newest = run_copy / "checkpoints" / str(STEPS)
    data = max((newest / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    flip_bytes(data, 16)
    status, lines = cli(capsys, "export", run_copy)
    assert status == 0, lines
    assert any(f"checkpoint {newest} does not restore" in line and "differ from the checksums"
               in line and f"trying step {STEPS - 2}" in line for line in lines), lines
    status, lines = cli(capsys, *train_args(model, run_copy, "--resume"))
    assert status == 0, lines
    assert any(f"resuming {run_copy} at step {STEPS - 2}" in line for line in lines), lines
    assert [p.name.split("-")[0] for p in (run_copy / "checkpoints.damaged").iterdir()] == \
        [str(STEPS)]


def test_row12_the_checksums_see_any_flipped_bit_of_every_dtype():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16", "int32", "bool", "int8"):
        x = np.asarray(rng.standard_normal((3, 5)) > 0 if dtype == "bool" else
                       rng.standard_normal((3, 5)) * 10).astype(
            jnp.dtype(dtype) if dtype != "bool" else bool)
        tree = {"a": jnp.asarray(x)}
        base = value_checksums(tree)
        flipped = x.copy()
        flipped.reshape(-1).view(np.uint8)[7] ^= 1 if dtype == "bool" else 0x10
        assert value_checksums({"a": jnp.asarray(flipped)}) != base, dtype
        swapped = x.copy()
        swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
        if not np.array_equal(swapped, x):
            assert value_checksums({"a": jnp.asarray(swapped)}) != base, dtype


def fake_cache(root):
    """A cache folder as default_model_dir leaves it (marker with sizes and SHA-256)."""
    from safetensors.numpy import save_file

    folder = root / default_model.DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "gemma3_text"}')
    save_file({"w": np.ones((64, 64), np.float32)}, str(folder / "model.safetensors"))
    files = sorted(folder.iterdir())
    (folder / MARKER_FILE).write_text(json.dumps({
        "sizes": {p.name: p.stat().st_size for p in files},
        "sha256": {p.name: sha(p) for p in files}}))
    return folder


def test_row13_flipped_bytes_in_the_converted_cache_are_found(tmp_path):
    folder = fake_cache(tmp_path)
    assert default_model_dir(tmp_path) == folder
    flip_bytes(folder / "model.safetensors", 4096)
    with pytest.raises(CacheError, match="model.safetensors: its bytes differ from what the "
                                         "conversion wrote") as error:
        default_model_dir(tmp_path)
    assert f"rm -r {folder}" in str(error.value)


def test_row13_a_cache_from_before_checksums_gets_them_recorded(tmp_path):
    folder = fake_cache(tmp_path)
    record = json.loads((folder / MARKER_FILE).read_text())
    (folder / MARKER_FILE).write_text(json.dumps({"sizes": record["sizes"]}))
    assert default_model_dir(tmp_path) == folder
    assert json.loads((folder / MARKER_FILE).read_text())["sha256"] == record["sha256"]
    flip_bytes(folder / "model.safetensors", 4096)
    with pytest.raises(CacheError, match="its bytes differ"):
        default_model_dir(tmp_path)


# --- 14-22: bad values ----------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--fft-lr", "inf", "--fft-lr must be a finite number, got inf"),
    ("--fft-weight-decay", "inf", "--fft-weight-decay must be a finite number"),
    ("--lora-lr", "nan", "--lora-lr must be a finite number"),
    ("--lora-alpha", "nan", "--lora-alpha must be a finite number"),
    ("--lora-alpha", "-32", "--lora-alpha must be > 0"),
    ("--fft-lr", "-1e-4", "fft-lr must be >= 0"),
    ("--eval-limit", "-1", "--eval-limit must be >= 1, got -1"),
    ("--epochs", "inf", "--epochs must be a finite number"),
    ("--epochs", "1e30", "--epochs must be > 0 and at most"),
    ("--steps", str(2**40), "--steps must be between 1 and"),
])
def test_rows14_to_16_and_19_bad_numbers_are_refused_at_parse_time(model, tmp_path, capsys,
                                                                   flag, value, message):
    args = train_args(model, tmp_path / "run", f"{flag}={value}")
    if flag in ("--epochs", "--steps"):  # --epochs counts only without --steps
        at = args.index("--steps")
        del args[at:at + 2]
    status, lines = cli(capsys, *args)
    one_error(status, lines, message)
    assert not (tmp_path / "run").exists()


REWRITE = {"prompt": "{} was born in", "subject": "Ada", "target_new": {"str": "Paris"},
           "target_true": {"str": "London"}}


@pytest.mark.parametrize("row,message", [
    ({"requested_rewrite": {**REWRITE, "prompt": 5}},
     "row 1: field requested_rewrite.prompt must be text, got 5"),
    ({"requested_rewrite": {**REWRITE, "subject": 7}},
     "row 1: field requested_rewrite.subject must be text, got 7"),
    ({"requested_rewrite": REWRITE, "neighborhood_prompts": 5},
     "row 1: field neighborhood_prompts must be a list of prompts, got 5"),
    ({"requested_rewrite": REWRITE, "paraphrase_prompts": "Ada lives in"},
     "row 1: field paraphrase_prompts must be a list of prompts, got 'Ada lives in'"),
])
def test_rows17_18_a_bad_fact_row_names_its_row_and_field(model, tmp_path, capsys, row,
                                                          message):
    source = tmp_path / "facts.jsonl"
    source.write_text(json.dumps(row) + "\n")
    status, lines = cli(capsys, "eval", "--model", model, "--task", "fact", "--source", source)
    one_error(status, lines, str(source), message)


def test_row22_a_med_row_with_a_bad_option_index_names_its_row_and_field(model, tmp_path,
                                                                         capsys):
    row = {"question": "q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}
    source = tmp_path / "med.jsonl"
    source.write_text("".join(json.dumps({**row, "cop": cop}) + "\n" for cop in (1, "b")))
    status, lines = cli(capsys, "eval", "--model", model, "--task", "med", "--source", source)
    one_error(status, lines, str(source), "row 2: field cop must be an option index", "'b'")


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "config.json").write_text(
        (f / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": "32"')),
     "config.json: field hidden_size must be an integer, got '32'"),
    (lambda f: (f / "config.json").write_text('{"hidden_size": 32, oops}'),
     "config.json: not valid JSON (Expecting property name"),
    (lambda f: (f / "tokenizer.json").write_text("not json"), "tokenizer.json: not valid JSON"),
    (lambda f: [p.unlink() for p in f.glob("tokenizer*")], "no tokenizer (tokenizer.json"),
])
def test_rows20_22_a_bad_model_folder_names_the_file_and_field(model, tmp_path, capsys, damage,
                                                               message):
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    damage(folder)
    status, lines = cli(capsys, *train_args(folder, tmp_path / "run"))
    one_error(status, lines, message)


# Runs the CLI; with MOLF_TEST_BREAK_AT=k the checkpoints folder becomes a file (a folder that
# can no longer be written, even by root) once step k-1's checkpoint is committed, just before
# step k's save.
_BREAKER = """
import os, shutil, sys
from molf_jax.train import checkpoint
break_at = int(os.environ["MOLF_TEST_BREAK_AT"])
save = checkpoint.RunCheckpointer.save
def breaking_save(self, step, *args):
    if step == break_at:
        self.wait()
        shutil.rmtree(self.directory)
        open(self.directory, "w").write("not a folder")
    save(self, step, *args)
checkpoint.RunCheckpointer.save = breaking_save
from molf_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_row21_a_failed_save_stops_the_run_with_one_line(model, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(model, run_dir, "--save-every", "1", "--log-every", "1")
    done = subprocess.run([sys.executable, "-c", _BREAKER, *args], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, MOLF_TEST_BREAK_AT="2"))
    err = done.stderr.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "checkpoint step 2 could not be written in" in errors[0], errors[0]
    assert "--resume continues from the last checkpoint" in errors[0]
    assert not any("Traceback" in line or "Exception" in line for line in err), done.stderr
    # The loop stopped at that save: step 3 was never trained.
    steps = [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")]
    assert max(steps) == 2, steps
