"""Families, HF config dispatch, and the model/params entry points."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from molf_jax.lora import LoraSpec
from molf_jax.models import gemma3, qwen2
from molf_jax.models.layers import Dtype
from molf_jax.models.transformer import CausalLM, DecoderConfig

__all__ = [
    "FAMILIES",
    "Family",
    "abstract_params",
    "build_model",
    "family_of",
    "init_params",
    "load_config",
    "output_kernel",
    "preset",
    "preset_names",
    "TINY_PRESETS",
]


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model family contributes.

    Attributes:
      name: short name. config_cls, block: its config class and decoder block.
      param_table: rows (HF name, Flax path, transpose), see ``qwen2/params.py``.
      architectures, model_types: the HF ``architectures`` / ``model_type`` values it reads.
    """

    name: str
    config_cls: type[DecoderConfig]
    block: type
    param_table: tuple[tuple[str, str, bool], ...]
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]


FAMILIES = (
    Family("qwen2", qwen2.Qwen2Config, qwen2.Qwen2Block, qwen2.PARAM_TABLE,
           ("Qwen2ForCausalLM",), ("qwen2",)),
    Family("gemma3", gemma3.Gemma3Config, gemma3.Gemma3Block, gemma3.PARAM_TABLE,
           ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"), ("gemma3_text", "gemma3")),
)


def family_of(config: DecoderConfig) -> Family:
    """The family a config belongs to."""
    for family in FAMILIES:
        if isinstance(config, family.config_cls):
            return family
    raise TypeError(f"{type(config).__name__} is not a config of a known family")


def load_config(hf_dir_or_dict: str | os.PathLike | dict) -> DecoderConfig:
    """Reads an HF ``config.json`` (a folder, the file, or its dict) into our config.

    The family comes from ``architectures`` (first known entry) or else ``model_type``.

    Raises:
      FileNotFoundError: no config.json. ValueError: unsupported architecture or setting.

    Example:
      >>> load_config({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
      ...              "num_attention_heads": 4, "num_hidden_layers": 2}).num_layers
      2
    """
    if isinstance(hf_dir_or_dict, dict):
        hf, where = hf_dir_or_dict, "config dict"
    else:
        where = os.fspath(hf_dir_or_dict)
        if os.path.isdir(where):
            where = os.path.join(where, "config.json")
        if not os.path.isfile(where):
            raise FileNotFoundError(f"{where}: no config.json found")
        with open(where, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except ValueError as err:
                raise ValueError(f"{where}: not valid JSON ({err})") from None
    _check_numbers(hf, where)
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    for family in FAMILIES:
        if any(a in family.architectures for a in architectures) or (
                not architectures and model_type in family.model_types):
            return family.config_cls.from_hf(hf, where)
    supported = sorted(a for f in FAMILIES for a in f.architectures)
    raise ValueError(f"{where}: unsupported architecture {architectures or None} "
                     f"(model_type {model_type!r}); supported: {supported}")


# Random models for smoke runs (``molf-jax train --model tiny-qwen2``): two layers, width 64
# and the 260-token vocabulary of the byte-level tokenizer that random-init presets use
# (``molf_jax.data.byte_level_tokenizer``: pad 0, eos 1, bos 2), so nothing is downloaded.
# Each keeps what sets its family apart: Qwen2's q/k/v biases and grouped-query attention;
# Gemma 3's local and global layers, scaled embeddings and query_pre_attn_scalar != head_dim.
_TINY = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=2048,
             pad_token_id=0, eos_token_id=(1,), bos_token_id=2)
TINY_PRESETS: dict[str, tuple[type[DecoderConfig], dict]] = {
    "tiny-qwen2": (qwen2.Qwen2Config, dict(_TINY, rope_theta=10_000.0, attention_bias=True)),
    "tiny-gemma3": (gemma3.Gemma3Config, dict(
        _TINY, num_kv_heads=1, query_pre_attn_scalar=24.0, sliding_window=8,
        layer_types=("sliding_attention", "full_attention"), hidden_act="gelu_pytorch_tanh")),
}


def preset_names() -> list[str]:
    """Every name `preset` knows, tiny smoke-run presets first.

    Example:
      >>> preset_names()[:2]
      ['tiny-gemma3', 'tiny-qwen2']
    """
    return sorted(TINY_PRESETS) + sorted(n for f in FAMILIES for n in f.config_cls.presets)


# HF config fields read as numbers: a string there ("32") fails deep inside model building.
_INTEGER_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                   "max_position_embeddings", "bos_token_id", "pad_token_id")
_REAL_FIELDS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
                "final_logit_softcapping")


def _check_numbers(hf: Any, where: str) -> None:
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: not a model configuration (a JSON object)")
    for key in (*_INTEGER_FIELDS, *_REAL_FIELDS):
        value = hf.get(key)
        kinds = int if key in _INTEGER_FIELDS else (int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            kind = "an integer" if key in _INTEGER_FIELDS else "a number"
            raise ValueError(f"{where}: field {key} must be {kind}, got {value!r}")


def preset(name: str, **overrides) -> DecoderConfig:
    """A named configuration of any family, e.g. ``preset('gemma3-1b')``, or a tiny random
    model for smoke runs (``'tiny-qwen2'``, ``'tiny-gemma3'``).

    Example:
      >>> preset("qwen2.5-0.5b").hidden_size
      896
      >>> preset("tiny-qwen2").vocab_size
      260
    """
    if name in TINY_PRESETS:
        config_cls, fields = TINY_PRESETS[name]
        return config_cls(**{**fields, **overrides})
    for family in FAMILIES:
        if name in family.config_cls.presets:
            return family.config_cls.preset(name, **overrides)
    raise KeyError(f"unknown preset {name!r}; known: {preset_names()}")


def build_model(config: DecoderConfig, *, lora: LoraSpec | None = None,
                scan_layers: bool = False, remat: str = "none", dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, attention_impl: str = "xla") -> CausalLM:
    """The linen model of ``config``'s family.

    Args:
      config: a family config (``load_config``, ``preset``).
      lora: LoRA experts for the targeted linears (their leaves must be in the params).
      scan_layers: stack the layers under one ``nn.scan`` (leaves under ``layers/`` get a
        leading axis L).
      remat: ``'none'``, ``'full'`` or ``'dots_saveable'``.
      dtype: compute dtype. param_dtype: parameter dtype.
      attention_impl: ``'xla'`` (default; any padding) or ``'cudnn'`` (GPU flash attention for
        right-padded training batches; decoding with a cache still uses XLA).

    Example:
      >>> model = build_model(preset("qwen2.5-0.5b"), scan_layers=True, remat="full")
    """
    return CausalLM(config=config, block=family_of(config).block, lora=lora,
                    scan_layers=scan_layers, remat=remat, attention_impl=attention_impl,
                    dtype=dtype, param_dtype=param_dtype)


def _init(model: CausalLM, rng: jax.Array) -> Any:
    ids = jnp.zeros((1, 4), jnp.int32)
    return model.init({"params": rng}, ids, jnp.ones_like(ids))["params"]


def init_params(model: CausalLM, rng: jax.Array) -> Any:
    """Random parameters (HF's init: N(0, 0.02) weights, unit norms; LoRA ``a`` uniform,
    ``b`` zero), jitted.

    Example:
      >>> params = init_params(model, jax.random.key(0))   # doctest: +SKIP
    """
    return jax.jit(_init, static_argnums=0)(model, rng)


def abstract_params(model: CausalLM) -> Any:
    """Shapes and dtypes of ``init_params(model, ...)`` without allocating anything."""
    return jax.eval_shape(functools.partial(_init, model), jax.random.key(0))


def output_kernel(params: Any, config: DecoderConfig) -> jax.Array:
    """The [D, V] output projection: ``lm_head/kernel`` or the tied embedding transposed.

    Example:
      >>> output_kernel(params, config).shape   # doctest: +SKIP
      (896, 151936)
    """
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]
