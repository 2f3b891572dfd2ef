"""Training: the pure step, the six modes, mesh sharding, orbax checkpoints, the run loop.

A run is resolved once (`plan_run`: the config with every open setting filled, the mode, the
mesh), assembled once (`assemble_run`), then trained (`train` does all three).

Example:
  >>> from molf_jax.train import TrainConfig, plan_run, train
  >>> plan_run(TrainConfig(mode="molfe", mesh="fsdp=1"), platform="cpu").config.lora_ranks
  (32, 128)
  >>> summary = train(TrainConfig(mode="molf", model="default", steps=20))   # doctest: +SKIP
"""

# Configuration, the plan and the run.
from molf_jax.train.config import ATTENTION, DTYPES, REMAT, ConfigError, TrainConfig
from molf_jax.train.modes import FFT_EXPERT_MODES, MODES, ROUTED_MODES, Mode, mode_of
from molf_jax.train.platform import PLATFORM_DEFAULTS, with_platform_defaults
from molf_jax.train.plan import RunPlan, plan_run, resolve_config
from molf_jax.train.setup import (ModelSource, Run, assemble_run, resolve_model, training_model,
                                  training_step)
from molf_jax.train.loop import NonFiniteLossError, RunSummary, train
from molf_jax.train.export import (RunArtifacts, adapter_refusal, export_artifacts, load_run,
                                   merge_adapters)
from molf_jax.train.checkpoint import ResumeError, RunCheckpointer

# Building blocks for custom loops and scripts.
from molf_jax.train.step import find_route_state, make_train_step
from molf_jax.train.modes import build_optimizer, lora_spec, make_schedule, mode_roles
from molf_jax.param_roles import ParamRole, split_trainable
from molf_jax.train.mesh import batch_sharding, make_mesh, on_mesh, param_sharding, parse_mesh
from molf_jax.trees import count_params, join_trees

__all__ = [
    "ATTENTION",
    "DTYPES",
    "FFT_EXPERT_MODES",
    "MODES",
    "Mode",
    "ModelSource",
    "PLATFORM_DEFAULTS",
    "REMAT",
    "ROUTED_MODES",
    "ConfigError",
    "NonFiniteLossError",
    "ParamRole",
    "ResumeError",
    "Run",
    "RunArtifacts",
    "RunCheckpointer",
    "RunPlan",
    "RunSummary",
    "TrainConfig",
    "batch_sharding",
    "build_optimizer",
    "count_params",
    "adapter_refusal",
    "assemble_run",
    "export_artifacts",
    "find_route_state",
    "join_trees",
    "load_run",
    "lora_spec",
    "make_mesh",
    "make_schedule",
    "make_train_step",
    "merge_adapters",
    "mode_of",
    "mode_roles",
    "on_mesh",
    "param_sharding",
    "parse_mesh",
    "plan_run",
    "resolve_config",
    "resolve_model",
    "split_trainable",
    "train",
    "training_model",
    "training_step",
    "with_platform_defaults",
]
