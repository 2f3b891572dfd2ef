"""The decoder-only skeleton both families share: config base, embedding, layer stack (plain,
scanned, rematerialised), final norm, output head and the KV cache.

A family contributes a config subclass and a ``DecoderBlock`` subclass; nothing else differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from molf_jax.lora import LoraSpec
from molf_jax.models.layers import (
    Dtype,
    RMSNorm,
    attention_mask,
    default_init,
    rope_cos_sin,
    rope_inv_freq,
    soft_cap,
)

__all__ = ["CausalLM", "DecoderConfig", "REMAT_POLICIES", "init_cache"]

LAYER_TYPES = ("full_attention", "sliding_attention")

# 'full' saves nothing inside a layer; 'dots_saveable' keeps matmul outputs and recomputes the
# cheap elementwise work.
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Hyper-parameters common to the decoder families (field names follow our code, the HF
    names are read by each family's ``from_hf``).

    Attributes:
      vocab_size, hidden_size, intermediate_size: V, D, F.
      num_layers, num_heads, num_kv_heads, head_dim: L, N, K, H.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: rotary base of global (full-attention) layers.
      rope_scaling_factor: HF ``rope_type="linear"`` factor of global layers (1 = none).
      layer_types: ``"full_attention"`` or ``"sliding_attention"`` per layer.
      sliding_window: window of sliding layers (HF semantics: the query and the window - 1
        slots before it).
      tie_word_embeddings: output head is the embedding table.
      max_position_embeddings: longest context the checkpoint was trained for (informative).
      hidden_act: MLP activation name as HF spells it.
      bos_token_id, eos_token_id, pad_token_id: special ids (eos may list several).
      final_logit_softcapping: ``cap * tanh(logits / cap)`` when set.
    """

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    scale_embeddings: ClassVar[bool] = False  # Gemma multiplies embeddings by sqrt(D)
    norm_offset: ClassVar[bool] = False  # Gemma's (1 + w) RMSNorm
    presets: ClassVar[dict[str, dict]] = {}

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling_factor: float = 1.0
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32_768
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        eos = self.eos_token_id
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        object.__setattr__(self, "eos_token_id", eos)
        name = type(self).__name__
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"{name}: {len(self.layer_types)} layer_types for "
                             f"{self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"{name}: unsupported layer types {unknown}; known: {LAYER_TYPES}")
        if any(self.layer_is_local) and not self.sliding_window:
            raise ValueError(f"{name}: sliding_attention layers need a sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{name}: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    @property
    def layer_is_local(self) -> tuple[bool, ...]:
        """Whether each layer uses the sliding window."""
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def rope(self, local: bool) -> tuple[float, float]:
        """(theta, linear factor) of the rotary embedding of local or global layers."""
        return self.rope_theta, self.rope_scaling_factor

    @classmethod
    def preset(cls, name: str, **overrides) -> DecoderConfig:
        """A named configuration of this family, e.g. ``Qwen2Config.preset('qwen2.5-1.5b')``."""
        if name not in cls.presets:
            raise KeyError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(cls.presets)}")
        return cls(**{**cls.presets[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict) -> DecoderConfig:
        raise NotImplementedError

    def to_hf(self) -> dict:
        raise NotImplementedError


def init_cache(config: DecoderConfig, batch: int, length: int, *, dtype: Dtype = jnp.float32,
               scan_layers: bool = False) -> Any:
    """Zero KV cache for ``length`` slots: a tuple of ``{'k', 'v'}`` [B, S, K, H] per layer, or
    one dict of [L, B, S, K, H] arrays for a scanned model.

    Example:
      >>> cache = init_cache(config, 2, 64)   # doctest: +SKIP
    """
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    if scan_layers:
        shape = (config.num_layers, *shape)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(config.num_layers))


class _Embedder(nn.Module):
    vocab_size: int
    hidden_size: int
    param_dtype: Dtype

    def setup(self):
        self.embedding = self.param("embedding", default_init,
                                    (self.vocab_size, self.hidden_size), self.param_dtype)

    def __call__(self, ids: jax.Array, dtype: Dtype) -> jax.Array:
        return jnp.take(self.embedding, ids, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.embedding.astype(x.dtype).T)


class _LayerStack(nn.Module):
    """Holds the unscanned layers as children ``'0'``, ``'1'``, ... (paths ``layers/{i}/...``)."""

    block: Any
    flags: tuple[bool, ...]
    block_kwargs: tuple[tuple[str, Any], ...]

    @nn.compact
    def __call__(self, x, ctx, cache):
        kwargs = dict(self.block_kwargs)
        new_cache = []
        for i, local in enumerate(self.flags):
            layer = {"cache": None if cache is None else cache[i]}
            x, layer_cache = self.block(**kwargs, is_local=local, name=str(i))(x, ctx, layer)
            new_cache.append(layer_cache)
        return x, None if cache is None else tuple(new_cache)


class CausalLM(nn.Module):
    """Decoder-only language model.

    ``apply({'params': p}, input_ids, attention_mask)`` returns logits [B, T, V]; positions come
    from ``cumsum(attention_mask) - 1`` so left padding works. With ``cache`` (from
    ``init_cache``) and ``cache_index`` (first slot the new tokens fill), ``attention_mask``
    covers all S cache slots and the call returns ``(logits, new_cache)``.

    Attributes:
      config: a family config. block: the family's ``DecoderBlock`` subclass.
      lora: LoRA experts on the targeted linears, or None.
      scan_layers: one ``nn.scan`` over stacked layer parameters (leading axis L).
      remat: ``'none'``, ``'full'`` or ``'dots_saveable'``.
      attention_impl: ``'xla'`` or ``'cudnn'`` (see ``layers.Attention``).
      dtype: compute dtype. param_dtype: parameter storage dtype.
    """

    config: DecoderConfig
    block: Any
    lora: LoraSpec | None = None
    scan_layers: bool = False
    remat: str = "none"
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.remat != "none" and self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be 'none' or one of {sorted(REMAT_POLICIES)}, "
                             f"got {self.remat!r}")
        if self.attention_impl not in ("xla", "cudnn"):
            raise ValueError(f"attention_impl must be 'xla' or 'cudnn', "
                             f"got {self.attention_impl!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 deterministic: bool = True, return_hidden: bool = False, cache: Any = None,
                 cache_index: jax.Array | int | None = None):
        c = self.config
        batch, length = input_ids.shape
        if attention_mask is None:
            total = length if cache is None else _cache_length(cache, self.scan_layers)
            attention_mask = jnp.ones((batch, total), jnp.int32)
        valid = attention_mask.astype(bool)
        slots = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1
        if cache is None:
            positions = slots
            q_index = jnp.arange(length)
        else:
            if cache_index is None:
                raise ValueError("CausalLM: pass cache_index together with cache")
            cache_index = jnp.asarray(cache_index, jnp.int32)
            positions = jax.lax.dynamic_slice_in_dim(slots, cache_index, length, axis=1)
            q_index = cache_index + jnp.arange(length)
        positions = jnp.maximum(positions, 0)

        embedder = _Embedder(c.vocab_size, c.hidden_size, self.param_dtype, name="embed_tokens")
        x = embedder(input_ids, self.dtype)
        if c.scale_embeddings:
            # HF multiplies by sqrt(D) rounded to the embedding's dtype.
            x = x * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)

        ctx = self._context(positions, q_index, valid, cache_index, cache is not None)
        x, cache = self._layers(x, ctx, cache, deterministic)
        x = RMSNorm(c.norm_offset, c.rms_norm_eps, self.param_dtype, name="norm")(x)
        if return_hidden:
            return x if cache is None else (x, cache)
        if c.tie_word_embeddings:
            logits = embedder.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=default_init,
                              name="lm_head")(x)
        logits = soft_cap(logits, c.final_logit_softcapping)
        return logits if cache is None else (logits, cache)

    def _context(self, positions, q_index, valid, cache_index, has_cache) -> dict:
        c = self.config
        has_local = any(c.layer_is_local)
        rope = {"global": rope_cos_sin(positions, rope_inv_freq(c.head_dim, *c.rope(False)),
                                       self.dtype)}
        if has_local and c.rope(True) != c.rope(False):
            rope["local"] = rope_cos_sin(positions, rope_inv_freq(c.head_dim, *c.rope(True)),
                                         self.dtype)
        ctx = {"rope": rope, "cache_index": cache_index}
        if self.attention_impl == "cudnn" and not has_cache:
            ctx["seq_lengths"] = valid.sum(-1).astype(jnp.int32)
            return ctx
        kv_index = jnp.arange(valid.shape[1])
        masks = {"global": attention_mask(q_index, kv_index, valid, None)}
        if has_local:
            masks["local"] = attention_mask(q_index, kv_index, valid, c.sliding_window)
        ctx["mask"] = masks
        return ctx

    def _layers(self, x, ctx, cache, deterministic):
        c = self.config
        block = self.block
        if self.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat],
                             prevent_cse=not self.scan_layers)
        kwargs = dict(config=c, lora=self.lora, deterministic=deterministic,
                      attention_impl=self.attention_impl, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      # dots_saveable would keep the merged LoRA kernels as saved matmul results
                      rematerialised=self.remat == "full")
        flags = c.layer_is_local
        if not self.scan_layers:
            stack = _LayerStack(block, flags, tuple(kwargs.items()), name="layers")
            return stack(x, ctx, cache)
        uniform = len(set(flags)) == 1
        layer = {"cache": cache}
        if not uniform:
            layer["local"] = jnp.asarray(flags)
        scanned = nn.scan(block, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast, 0), length=c.num_layers)
        return scanned(**kwargs, is_local=flags[0] if uniform else None, name="layers")(
            x, ctx, layer)


def _cache_length(cache, scan_layers: bool) -> int:
    return cache["k"].shape[2] if scan_layers else cache[0]["k"].shape[1]
