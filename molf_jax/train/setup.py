"""A run assembled from its plan in one place: model source, tokenizer, params, model, roles.

`assemble_run` is the one assembly path: the training loop (`molf_jax.train.loop`), `load_run`
(export), the reproduction, `scripts/bench.py` and the tests' tiny runs all build their run
here (the bench and the tests with a random-init model of their own shape). `training_step`
builds the jitted step that the loop runs and the bench times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from molf_jax import models
from molf_jax.adalora import AdaLoraSpec, add_adalora
from molf_jax.checkpoints import load_hf
from molf_jax.checkpoints.hf import check_tokenizer_files
from molf_jax.lora import LoraSpec, add_lora_experts, lora_paths
from molf_jax.train.config import ConfigError, TrainConfig
from molf_jax.train.mesh import param_sharding
from molf_jax.train.modes import mode_of
from molf_jax.train.plan import RunPlan
from molf_jax.train.step import jit_train_step, make_train_step
from molf_jax.trees import tree_paths

logger = logging.getLogger(__name__)

__all__ = ["ModelSource", "Run", "assemble_run", "resolve_model", "load_tokenizer",
           "build_params", "add_mode_adapters", "dtype_of", "training_model", "training_step",
           "model_identity"]


def dtype_of(name: str):
    """The jnp dtype of a resolved config's dtype setting."""
    if name is None:
        raise ConfigError("a dtype left to the platform: pass the config through "
                          "molf_jax.train.resolve_config (or plan_run) first")
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a run's base model comes from.

    Attributes:
      name: what the user gave ('default', a folder, or a preset name).
      hf_dir: the HF folder with weights and tokenizer, or None for a random-init preset.
      config: the model's `DecoderConfig`.
    """

    name: str
    hf_dir: Path | None
    config: Any


def resolve_model(name: str) -> ModelSource:
    """'default' -> the embedded Gemma 3 270M (converted once and cached); a folder -> that HF
    folder; a preset name (e.g. 'qwen2.5-1.5b') -> a random-init model of that shape."""
    if name == "default":
        from molf_jax.checkpoints.default_model import default_model_dir

        hf_dir = default_model_dir()
        return ModelSource(name, Path(hf_dir), models.load_config(hf_dir))
    if os.path.isdir(name):
        return ModelSource(name, Path(name), models.load_config(name))
    try:
        return ModelSource(name, None, models.preset(name))
    except KeyError:
        raise ConfigError(f"--model {name!r} is neither 'default', an existing HF folder, nor "
                          f"a preset name ({', '.join(models.preset_names())})") from None


def load_tokenizer(source: ModelSource):
    """The folder's tokenizer (transformers), or a byte-level one for random-init presets."""
    if source.hf_dir is None:
        from molf_jax.data import byte_level_tokenizer

        return byte_level_tokenizer()
    from transformers import AutoTokenizer

    check_tokenizer_files(source.hf_dir)
    return AutoTokenizer.from_pretrained(str(source.hf_dir))


def build_params(config: TrainConfig, source: ModelSource, mesh, *,
                 keys: tuple[jax.Array, jax.Array]) -> tuple[Any, LoraSpec | AdaLoraSpec | None]:
    """Base params (loaded straight onto the mesh, or random) plus the mode's LoRA experts
    (or AdaLoRA triplets), for a resolved config; ``keys`` draw the random base and the
    adapters."""
    param_dtype = dtype_of(config.param_dtype)
    rule = param_sharding(mesh)
    base_key, lora_key = keys
    if source.hf_dir is not None:
        _, params = load_hf(source.hf_dir, param_dtype=param_dtype,
                            scan_layers=config.scan_layers, shardings=rule)
    else:
        model = models.build_model(source.config, scan_layers=config.scan_layers,
                                   param_dtype=param_dtype)
        abstract = models.abstract_params(model)
        shardings = jax.tree.map(lambda x: rule("", x.shape), abstract)
        # Each device initialises only its own shards.
        params = jax.jit(lambda key: models.init_params(model, key),
                         out_shardings=shardings)(base_key)
    return add_mode_adapters(config, params, lora_key, rule)


def add_mode_adapters(config: TrainConfig, params: Any, rng: jax.Array, rule=None
                      ) -> tuple[Any, LoraSpec | AdaLoraSpec | None]:
    """``params`` plus the mode's LoRA experts (or AdaLoRA triplets) drawn from ``rng``, and
    their spec. ``rule(path, shape)`` places each leaf (`param_sharding`); None leaves them
    where they are made. A run's adapters use the second half of ``split(key(seed))``.

    Example:
      >>> _, lora_key = jax.random.split(jax.random.key(config.seed))       # doctest: +SKIP
      >>> params, spec = add_mode_adapters(config, base_params, lora_key)    # doctest: +SKIP
    """
    place = (lambda tree: tree) if rule is None else (
        lambda tree: jax.tree.map(lambda x: jax.device_put(x, rule("", x.shape)), tree))
    spec = mode_of(config).lora_spec(config)
    if isinstance(spec, AdaLoraSpec):
        try:
            params = add_adalora(params, spec, rng)
        except ValueError:
            raise ConfigError(f"--lora-targets {list(config.lora_targets)} match no linear of "
                              "this model") from None
        params = place(params)
    elif spec is not None:
        params = add_lora_experts(params, spec, rng)
        if not lora_paths(params):
            raise ConfigError(f"--lora-targets {list(config.lora_targets)} match no linear of "
                              "this model")
        params = place(params)
    return params, spec


@dataclasses.dataclass
class Run:
    """What a run is made of before it trains.

    Attributes:
      config: the resolved `TrainConfig` (`molf_jax.train.resolve_config`).
      source: where the base model comes from (`ModelSource`: name, HF folder, model config).
      tokenizer: the folder's tokenizer (byte-level for random-init presets).
      model: the training model (`training_model`), with the mode's LoRA experts.
      params: base params on the mesh plus the mode's adapters.
      lora: the mode's `LoraSpec` (`AdaLoraSpec` for adalora, None for fft).
      roles: every leaf's `ParamRole` (`mode_roles`: what trains, which expert, which group).
      mesh: the device mesh the params live on.
    """

    config: TrainConfig
    source: ModelSource
    tokenizer: Any
    model: Any
    params: Any
    lora: LoraSpec | AdaLoraSpec | None
    roles: Any
    mesh: Any = None


def assemble_run(plan: RunPlan, *, source: ModelSource | None = None,
                 keys: tuple[jax.Array, jax.Array] | None = None, abstract: bool = False,
                 ) -> Run:
    """Builds a planned run: the model source, the params on the plan's mesh with the mode's
    LoRA experts, the training model, the tokenizer and the parameter roles.

    Args:
      plan: the run's `molf_jax.train.RunPlan` (`plan_run(config)`).
      source: the base model; default ``resolve_model(plan.config.model)``. A `ModelSource`
        with no ``hf_dir`` initialises a random model of its config's shape (the bench and the
        tests pass one).
      keys: ``(base, adapters)`` random keys; default the split of ``key(config.seed)``.
      abstract: params as ``jax.ShapeDtypeStruct`` with their shardings, no array made (to
        lower or compile the step without memory).

    Example:
      >>> run = assemble_run(plan_run(TrainConfig(mode="molfe")))               # doctest: +SKIP
      >>> optimizer, schedules = build_optimizer(run.config, 100, run.roles)    # doctest: +SKIP
    """
    config, mesh = plan.config, plan.mesh
    source = source if source is not None else resolve_model(config.model)
    if keys is None:
        keys = tuple(jax.random.split(jax.random.key(config.seed)))
    spec = plan.mode.lora_spec(config)
    if abstract:
        rule = param_sharding(mesh)
        shapes = jax.eval_shape(lambda: build_params(config, source, mesh, keys=keys)[0])
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                             sharding=rule("", x.shape)), shapes)
    else:
        params, spec = build_params(config, source, mesh, keys=keys)
    return Run(config=config, source=source, tokenizer=load_tokenizer(source),
               model=training_model(config, source.config, spec), params=params, lora=spec,
               roles=plan.mode.roles(config, params), mesh=mesh)


def training_model(config: TrainConfig, model_config: Any, spec: LoraSpec | None):
    """The model a training step runs: the resolved config's LoRA experts, remat, attention
    kernel and dtypes. The trainer and `scripts/bench.py` both build their model here.

    Example:
      >>> model = training_model(config, source.config, lora_spec(config))   # doctest: +SKIP
    """
    return models.build_model(model_config, lora=spec, scan_layers=config.scan_layers,
                              remat=config.remat, dtype=dtype_of(config.compute_dtype),
                              param_dtype=dtype_of(config.param_dtype),
                              attention_impl=config.attention)


def training_step(config: TrainConfig, model, optimizer, roles: Any, params: Any,
                  opt_state: Any):
    """The jitted, donating step ``(params, opt_state, batch) -> (params, opt_state, metrics)``
    that the trainer runs and `scripts/bench.py` times, built from the config and the run's
    parameter roles (`mode_roles`), plus the trees whose shardings it keeps.

    Example:
      >>> step = training_step(config, model, optimizer, roles, params, opt_state)  # doctest: +SKIP
    """
    mode = mode_of(config)
    return jit_train_step(make_train_step(
        model, optimizer, roles=roles, seed=config.seed, loss_chunk=config.loss_chunk,
        dropout=mode.dropout(config), route_fft_column=mode.routes and mode.fft_expert,
        return_routing=mode.routes and config.routing_log_every > 0,
        regularizer=mode.regularizer(config)), params, opt_state)


def model_identity(config: TrainConfig, source: ModelSource, params: Any) -> dict:
    """What must match for a checkpoint to resume this run."""
    shapes = sorted((p, list(x.shape)) for p, x in zip(
        tree_paths(params), jax.tree.leaves(params)))
    return {
        "model": source.name,
        "model_type": type(source.config).__name__,
        "mode": config.mode,
        "lora_ranks": list(config.ranks),
        "scan_layers": config.scan_layers,
        "num_params": int(sum(math.prod(s) for _, s in shapes)),
        "shapes_digest": _digest(shapes),
    }


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]
