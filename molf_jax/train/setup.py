"""A run assembled from its config in one place: model source, tokenizer, params, model, roles.

`assemble_run` serves the training loop (`molf_jax.train.loop`), `load_run` (export) and
`scripts/reproduce.py`; `training_model` and `training_step` build the model and the jitted step
that the loop runs and `scripts/bench.py` times.
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
from molf_jax.train.config import FFT_EXPERT_MODES, ROUTED_MODES, ConfigError, TrainConfig
from molf_jax.train.mesh import param_sharding
from molf_jax.train.modes import lora_spec, loss_regularizer, mode_roles
from molf_jax.train.platform import with_platform_defaults
from molf_jax.train.step import jit_train_step, make_train_step
from molf_jax.trees import tree_paths

logger = logging.getLogger(__name__)

__all__ = ["ModelSource", "Run", "assemble_run", "resolve_model", "load_tokenizer",
           "build_params", "add_mode_adapters", "dtype_of", "training_model", "training_step", "model_identity"]


def dtype_of(name: str):
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


def build_params(config: TrainConfig, source: ModelSource, mesh, *, rng: jax.Array
                 ) -> tuple[Any, LoraSpec | AdaLoraSpec | None]:
    """Base params (loaded straight onto the mesh, or random) plus the mode's LoRA experts
    (or AdaLoRA triplets)."""
    param_dtype = dtype_of(with_platform_defaults(config).param_dtype)
    rule = param_sharding(mesh)
    base_key, lora_key = jax.random.split(rng)
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
    spec = lora_spec(config)
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
      config: the `TrainConfig`.
      source: where the base model comes from (`ModelSource`: name, HF folder, model config).
      tokenizer: the folder's tokenizer (byte-level for random-init presets).
      model: the training model (`training_model`), with the mode's LoRA experts.
      params: base params on the mesh plus the mode's adapters.
      lora: the mode's `LoraSpec` (`AdaLoraSpec` for adalora, None for fft).
      roles: every leaf's `ParamRole` (`mode_roles`: what trains, which expert, which group).
    """

    config: TrainConfig
    source: ModelSource
    tokenizer: Any
    model: Any
    params: Any
    lora: LoraSpec | AdaLoraSpec | None
    roles: Any


def assemble_run(config: TrainConfig, mesh) -> Run:
    """Resolves the model, loads the params onto ``mesh`` with the mode's LoRA experts (keyed
    by ``config.seed``), builds the training model, loads the tokenizer and computes the
    parameter roles.

    Example:
      >>> run = assemble_run(TrainConfig(mode="molfe"), make_mesh("fsdp=-1"))   # doctest: +SKIP
      >>> optimizer, schedules = build_optimizer(run.config, 100, run.roles)    # doctest: +SKIP
    """
    source = resolve_model(config.model)
    params, spec = build_params(config, source, mesh, rng=jax.random.key(config.seed))
    return Run(config=config, source=source, tokenizer=load_tokenizer(source),
               model=training_model(config, source.config, spec), params=params, lora=spec,
               roles=mode_roles(config, params))


def training_model(config: TrainConfig, model_config: Any, spec: LoraSpec | None):
    """The model a training step runs: the config's LoRA experts, remat, attention kernel and
    dtypes (the platform's where the config leaves them None). The trainer and
    `scripts/bench.py` both build their model here.

    Example:
      >>> model = training_model(config, source.config, lora_spec(config))   # doctest: +SKIP
    """
    config = with_platform_defaults(config)
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
    return jit_train_step(make_train_step(
        model, optimizer, roles=roles, seed=config.seed, loss_chunk=config.loss_chunk,
        dropout=config.mode != "fft" and config.lora_dropout > 0,
        route_fft_column=config.mode in FFT_EXPERT_MODES,
        return_routing=config.mode in ROUTED_MODES and config.routing_log_every > 0,
        regularizer=loss_regularizer(config)), params, opt_state)


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
