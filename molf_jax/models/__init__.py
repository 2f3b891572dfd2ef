"""Flax ports of the Qwen2 and Gemma 3 text decoders, loadable from HF checkpoints.

Parameter paths read like HF module names (``layers/3/mlp/up_proj/kernel``); see
docs/design.md section 2.

Example:
  >>> from molf_jax import models
  >>> config = models.preset("qwen2.5-0.5b")
  >>> model = models.build_model(config, scan_layers=True)
"""

# Entry points
from molf_jax.models.registry import (
    FAMILIES,
    Family,
    abstract_params,
    build_model,
    family_of,
    init_params,
    load_config,
    output_kernel,
    preset,
    preset_names,
)

# Configs, the model and its loss
from molf_jax.models.loss import next_token_loss, next_token_loss_sum
from molf_jax.models.layers import soft_cap
from molf_jax.projections import PROJECTIONS
from molf_jax.models.transformer import CausalLM, DecoderConfig, init_cache
from molf_jax.models.qwen2 import Qwen2Config
from molf_jax.models.gemma3 import Gemma3Config

__all__ = [
    "FAMILIES",
    "CausalLM",
    "DecoderConfig",
    "Family",
    "Gemma3Config",
    "PROJECTIONS",
    "Qwen2Config",
    "abstract_params",
    "build_model",
    "family_of",
    "init_cache",
    "init_params",
    "load_config",
    "next_token_loss",
    "next_token_loss_sum",
    "output_kernel",
    "preset",
    "preset_names",
    "soft_cap",
]
