"""A run directory in object storage (``--out-dir gs://bucket/run``, issue 27 item 7), tested
offline with etils.epath's own testing mock, which maps ``gs://`` onto a local folder here.

What is covered: the run directory's checks, its lock, the logs and their cut on resume, the
JSON files, and exports. Orbax's array writes go through tensorstore's own storage drivers,
which the mock does not reach; a checkpoint in a real bucket is left to a run with one.
"""

import contextlib
import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from molf_jax.checkpoints.folders import EXPORT_MARKER
from molf_jax.cli import main as cli_main
from molf_jax.paths import PathError, is_remote, writable_folder, write_replacing
from molf_jax.run_dir import RunDir, RunLock, RunLockedError, claimed
from molf_jax.train.runlog import RunLog, cut_log
from tiny_run import tiny_hf_folder


@contextlib.contextmanager
def gs_in(folder):
    """``gs://X`` is ``folder/X`` while in the block (every epath operation is redirected)."""
    prefix = "gs://"

    def local(path):
        text = os.fspath(path)
        return os.path.join(folder, text[len(prefix):]) if text.startswith(prefix) else text

    def one(fn, path, *args, **kwargs):
        return fn(local(path), *args, **kwargs)

    def two(fn, src, dst, *args, **kwargs):
        return fn(local(src), local(dst), *args, **kwargs)

    def glob(fn, pattern):
        found = fn(local(pattern))
        if not os.fspath(pattern).startswith(prefix):
            return found
        return [prefix + os.path.relpath(p, folder) for p in found]

    with epath_testing.mock_epath(
            open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
            rmtree=one, stat=one, walk=one, rename=two, replace=two, copy=two, glob=glob):
        yield


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a gs:// path taken for a local one would land here
    with gs_in(tmp_path / "bucket"):
        yield tmp_path / "bucket"
    assert not (tmp_path / "gs:").exists()


def test_a_gs_out_dir_is_object_storage_not_a_local_folder_named_gs(bucket):
    run_dir = RunDir(writable_folder("gs://runs/molf", "--out-dir"))
    assert is_remote(run_dir.path) and isinstance(run_dir.path, epath.Path)
    assert (bucket / "runs" / "molf").is_dir()
    assert sorted(os.listdir(bucket / "runs" / "molf")) == []  # the write probe is gone


def test_logs_and_json_files_are_written_into_the_bucket(bucket):
    run_dir = RunDir(writable_folder("gs://runs/molf", "--out-dir"))
    write_replacing(run_dir.config, json.dumps({"mode": "molf"}))
    log = RunLog(run_dir)
    log.write_routing_table(["layers.0.q_proj"], ["fft", "lora_1 (r=4)"], np.ones((1, 2)))
    for step in (1, 2, 3):
        log.metrics({"step": step, "loss": 1.0 / step})
        log.routing(step, np.array([[1, 0]]), np.array([[0.5, float("nan")]]))
    log.flush()  # what the loop does before each checkpoint
    local = bucket / "runs" / "molf"
    assert [json.loads(line)["step"] for line in open(local / "metrics.jsonl")] == [1, 2, 3]
    assert json.loads((local / "routing_modules.json").read_text())["experts"][0] == "fft"
    log.metrics({"step": 4, "loss": 0.2})
    log.close()
    assert len(open(local / "metrics.jsonl").readlines()) == 4
    assert json.loads((local / "run_config.json").read_text()) == {"mode": "molf"}

    # A resume cuts the logs back to its checkpoint's step, in the bucket too.
    assert cut_log(run_dir.metrics, 2) == 2
    resumed = RunLog(run_dir, resume_step=2)
    resumed.metrics({"step": 3, "loss": 0.3})
    resumed.close()
    assert [json.loads(line)["step"] for line in open(local / "metrics.jsonl")] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in open(local / "routing.jsonl")] == [1, 2]


def test_one_writer_per_run_directory_in_the_bucket(bucket):
    run_dir = RunDir(writable_folder("gs://runs/molf", "--out-dir"))
    with claimed(run_dir, "train", fresh=True):
        assert json.loads((bucket / "runs" / "molf" / "molf_jax.lock").read_text())[
            "command"] == "train"
        with pytest.raises(RunLockedError, match="delete that file if no process"):
            RunLock(run_dir, "export").acquire()
    assert not (bucket / "runs" / "molf" / "molf_jax.lock").exists()


def test_a_fresh_run_refuses_a_bucket_folder_of_other_files(bucket):
    (bucket / "runs" / "theirs").mkdir(parents=True)
    (bucket / "runs" / "theirs" / "data.csv").write_text("a,b\n")
    run_dir = RunDir("gs://runs/theirs")
    with pytest.raises(PathError, match=r"holds files molf_jax did not write \(data.csv\)"):
        with claimed(run_dir, "train", fresh=True):
            pass
    assert sorted(os.listdir(bucket / "runs" / "theirs")) == ["data.csv"]


@pytest.fixture
def lora_run(tmp_path):
    """A finished one-step lora run (local: orbax's arrays cannot go through the mock)."""
    model = tiny_hf_folder(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    assert cli_main(["train", "--model", str(model), "--mode", "lora", "--lora-ranks", "4",
                     "--task-size", "8", "--batch-size", "4", "--max-length", "96", "--steps",
                     "1", "--mesh", "fsdp=1", "--no-eval", "--no-export", "--out-dir",
                     str(run_dir)]) == 0
    return run_dir


def test_an_export_into_the_bucket(lora_run, bucket, capsys):
    run_dir = lora_run
    (bucket / "models" / "taken").mkdir(parents=True)
    (bucket / "models" / "taken" / "weights.bin").write_text("theirs")
    status = cli_main(["export", str(run_dir), "--merged", "gs://models/taken"])
    assert status == 2 and "holds files molf_jax did not write (weights.bin)" in \
        capsys.readouterr().err
    assert cli_main(["export", str(run_dir), "--merged", "gs://models/merged", "--adapter",
                     "gs://models/adapter"]) == 0
    merged, adapter = bucket / "models" / "merged", bucket / "models" / "adapter"
    assert {"config.json", "model.safetensors", EXPORT_MARKER} <= set(os.listdir(merged))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    from molf_jax.checkpoints import load_hf

    config, params = load_hf(merged)
    assert config.num_layers == 2
