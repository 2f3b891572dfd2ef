"""The benchmark times the trainer's step, and the trainer's numerics follow the platform."""

import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from molf_jax.train import (TrainConfig, assemble_run, build_optimizer, plan_run,
                            split_trainable)
from molf_jax.cli.train import config_from_args
from molf_jax.cli import build_parser
from molf_jax.train.config import ConfigError
from molf_jax.train.mesh import batch_sharding, param_sharding
from molf_jax.train.platform import with_platform_defaults
from molf_jax.train.setup import training_step

from molf_jax.benchmarks import step as bench
from molf_jax.benchmarks import tables as bench_table

ROOT = Path(__file__).resolve().parents[1]

def abstract(tree, mesh):
    rule = param_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=rule("", x.shape)), tree)


def trainer_step_text(train_flags, numerics_of):
    """The trainer's step for ``molf-jax train FLAGS`` (random-init preset), lowered on
    abstract arrays, as ``train`` builds it."""
    plan = plan_run(config_from_args(build_parser().parse_args(["train", *train_flags])),
                    platform=numerics_of)
    run = assemble_run(plan, abstract=True)
    trainable, _ = split_trainable(run.params, run.roles)
    tx, _ = build_optimizer(run.config, total_steps=1000, roles=run.roles)  # bench's length
    opt_state = abstract(jax.eval_shape(tx.init, trainable), plan.mesh)
    step = training_step(run.config, run.model, tx, run.roles, run.params, opt_state)
    return step.lower(run.params, opt_state, _batch(run.config, plan.mesh)).as_text()


def _batch(config, mesh):
    ids = jax.ShapeDtypeStruct((1, config.batch_size, config.max_length), np.int32,
                               sharding=batch_sharding(mesh))
    return {"input_ids": ids, "attention_mask": ids, "loss_mask": ids, "step": np.int32(0)}


def bench_step_text(bench_flags):
    setup = bench.setup(bench.parse_args(bench_flags))
    params = abstract(jax.eval_shape(setup.initial_params), setup.mesh)
    trainable, _ = split_trainable(params, setup.roles)
    opt_state = abstract(jax.eval_shape(setup.tx.init, trainable), setup.mesh)
    step = bench.train_step(setup, setup.model(), params, opt_state)
    return step.lower(params, opt_state, _batch(setup.config, setup.mesh)).as_text()


def test_bench_times_the_step_the_trainer_runs_from_the_same_settings():
    """One setting each way: the bench's flags and the trainer's for the same run lower to the
    same program, with the GPU's numerics (bf16, full remat) on this CPU; a different remat
    in the trainer gives a different one."""
    common = ["--model", "qwen2.5-0.5b", "--mode", "molf", "--lora-ranks", "4",
              "--mesh", "fsdp=1", "--loss-chunk", "2048", "--attention", "xla"]
    timed = bench_step_text([*common, "--batch", "4", "--length", "32", "--numerics-of", "gpu"])
    trainer = [*common, "--batch-size", "4", "--max-length", "32", "--lora-dropout", "0"]
    assert trainer_step_text(trainer, "gpu") == timed
    assert "bf16" in timed
    assert trainer_step_text([*trainer, "--remat", "none"], "gpu") != timed


def test_platform_defaults_fill_only_what_the_config_leaves_open():
    gpu = with_platform_defaults(TrainConfig(), "gpu")
    assert (gpu.attention, gpu.param_dtype, gpu.state_dtype, gpu.compute_dtype, gpu.remat) == \
        ("cudnn", "bfloat16", "bfloat16", "bfloat16", "full")
    cpu = with_platform_defaults(TrainConfig(), "cpu")
    assert (cpu.attention, cpu.param_dtype, cpu.state_dtype, cpu.compute_dtype, cpu.remat) == \
        ("xla", "float32", "float32", "float32", "none")
    assert with_platform_defaults(TrainConfig(), "tpu").attention == "xla"
    chosen = with_platform_defaults(TrainConfig(param_dtype="float32", attention="xla"), "gpu")
    assert (chosen.param_dtype, chosen.attention, chosen.state_dtype) == \
        ("float32", "xla", "bfloat16")
    with pytest.raises(ConfigError, match="unknown attention 'flash'"):
        TrainConfig(attention="flash")


def test_routed_step_keeps_no_copy_of_the_old_adam_moments():
    """A skipped (non-finite) step keeps the old state through a branch, not a select: with the
    select XLA copied old moments for the fused parameter update (here the embedding's and the
    norms'; at Qwen2.5-3B on the H200 the MLP kernels', 9.1 GiB)."""
    setup = bench.setup(bench.parse_args(["--model", "qwen2.5-0.5b", "--layers", "2", "--mode",
                                          "molf", "--lora-ranks", "4", "--mesh", "fsdp=1"]))
    params = abstract(jax.eval_shape(setup.initial_params), setup.mesh)
    opt_state = abstract(jax.eval_shape(setup.tx.init, split_trainable(params, setup.roles)[0]),
                         setup.mesh)
    step = bench.train_step(setup, setup.model(), params, opt_state)
    config = setup.config.replace(batch_size=2, max_length=32)
    hlo = step.lower(params, opt_state, _batch(config, setup.mesh)).compile().as_text()
    copied = re.findall(r"copy\(%(opt_state\w*__(?:mu|nu)__\w*)", hlo)
    assert not copied, copied[:4]


def test_the_speed_tables_are_the_scripts_output(capsys):
    """docs/performance.md's speed tables are pasted output, never typed by hand."""
    readme = (ROOT / "docs" / "performance.md").read_text()

    def block(marker):
        start = readme.index(f"<!-- {marker} -->") + len(f"<!-- {marker} -->")
        return readme[start:readme.index("<!-- end -->", start)].strip()

    for section, marker in (("speed", ""), ("memory-model", " --memory-model"),
                            ("trainer", " --trainer")):
        bench_table.main(section=section)
        assert block(f"python scripts/bench_table.py{marker}") == \
            capsys.readouterr().out.strip(), section
