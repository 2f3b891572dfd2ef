"""Blocks shared by the decoder families: RMSNorm, rotary embeddings, attention, gated MLP, and
the LoRA-aware linear.

Axis names in shapes: B batch, T query length, S key length, D model width, N query heads,
K key/value heads, H head width, F MLP width, L layers.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from molf_jax.adalora import ADALORA_KEY, AdaLoraSpec
from molf_jax.lora import LoraSpec, expert_key, lora_a_init
from molf_jax.models.merged_lora import merged_lora_linear
from molf_jax.projections import ATTENTION_PROJECTIONS, MLP_PROJECTIONS

__all__ = [
    "Attention",
    "DecoderBlock",
    "GatedMLP",
    "LoraLinear",
    "RMSNorm",
    "apply_rope",
    "attention_mask",
    "cudnn_attention_kwargs",
    "rope_cos_sin",
    "rope_inv_freq",
]

Dtype = Any


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """Final logit soft-capping, ``cap * tanh(logits / cap)`` (Gemma 2/3); unchanged without
    a cap.

    Example:
      >>> float(soft_cap(jnp.asarray(100.0), 30.0)) < 30.0
      True
    """
    return cap * jnp.tanh(logits / cap) if cap else logits


# HF initialises linear and embedding weights with N(0, initializer_range=0.02).
default_init = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, with parameter ``scale``.

    Attributes:
      offset: Gemma's form ``x_hat * (1 + scale)`` computed in float32 then cast (scale starts
        at 0); otherwise Llama/Qwen's ``scale * x_hat`` with ``x_hat`` cast to the input dtype
        first (scale starts at 1). Both follow the HF modules bit for bit in float32.
      eps: added to the mean square.
    """

    offset: bool = False
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, linear_factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies of rotary embeddings, float32 as HF computes them.

    ``linear_factor`` is HF's ``rope_type="linear"`` scaling (positions divided by the factor).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    return (inv_freq / np.float32(linear_factor)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: Dtype):
    """cos and sin tables [B, T, H] for integer ``positions`` [B, T] (HF's half-split layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` [B, T, N, H] by the tables [B, T, H] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(q_index: jax.Array, kv_index: jax.Array, kv_valid: jax.Array,
                   window: int | None) -> jax.Array:
    """Boolean mask [B, 1, T, S]: causal, key padding and, if ``window``, a sliding window.

    Indices are slots in the sequence (or KV cache), as HF's masks use them; a query sees the
    ``window`` most recent slots including its own (HF: ``kv > q - window``).
    """
    q = q_index[:, None]
    kv = kv_index[None, :]
    allowed = kv <= q
    if window is not None:
        allowed = allowed & (kv > q - window)
    return allowed[None, None, :, :] & kv_valid[:, None, None, :]


def cudnn_attention_kwargs(seq_lengths: jax.Array, window: int | None) -> dict:
    """What the cuDNN path passes to `jax.nn.dot_product_attention` besides q, k, v and scale.

    The same keys as `attention_mask` describes, in the kernel's terms: causal, the first
    ``seq_lengths`` [B] slots of each right-padded row valid, and, if ``window``, the ``window``
    most recent slots including the query's own (HF's ``kv > q - window``: ``window - 1`` keys
    to the left). Pure, so CPU tests check it against the XLA path's mask.

    Example:
      >>> cudnn_attention_kwargs(jnp.array([3]), 4)['local_window_size']
      (3, 0)
    """
    return dict(is_causal=True, query_seq_lengths=seq_lengths, key_value_seq_lengths=seq_lengths,
                local_window_size=None if window is None else (window - 1, 0))


def _select(local, global_value, local_value):
    """Picks the local or global variant; ``local`` is a Python bool or a traced scalar."""
    if isinstance(local, (bool, np.bool_)):
        return local_value if local else global_value
    return jax.tree_util.tree_map(lambda g, l: jnp.where(local, l, g), global_value, local_value)


class LoraLinear(nn.Module):
    """``y = x @ kernel + bias + sum_i s_i * (dropout(x) @ a_i) @ b_i``.

    The module gets experts only when ``lora`` matches its path in the parameter tree; its
    parameters are then ``kernel`` [in, out], ``bias`` [out], ``lora_i/a`` [in, r_i] and
    ``lora_i/b`` [r_i, out] (docs/design.md section 1).

    Attributes:
      features: output width.
      use_bias: whether the linear has a bias.
      lora: the LoRA spec, an ``AdaLoraSpec`` (one SVD triplet ``adalora/{a,e,b}``, peft's
        SVDLinear), or None for a plain linear.
      deterministic: no dropout when True; otherwise the ``'dropout'`` rng drives it.
      dtype: compute dtype. param_dtype: storage dtype of the parameters.
      rematerialised: the enclosing layer is fully rematerialised (remat 'full': its forward
        runs again right before its backward), so what the linear keeps for its backward lives
        for one layer only; the merged path (``LoraSpec.merged``) then keeps its merged kernel
        instead of rebuilding it.
    """

    features: int
    use_bias: bool = False
    lora: LoraSpec | None = None
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", default_init, (fan_in, self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if self.lora is None or not self.lora.matches("/".join(self.path)):
            return _add_bias(jnp.dot(x, kernel), bias, self.dtype)
        if isinstance(self.lora, AdaLoraSpec):
            return self._adalora(x, kernel, bias, fan_in)
        pairs = [_LoraPair(fan_in, expert.rank, self.features, self.param_dtype,
                           name=expert_key(i))()
                 for i, expert in enumerate(self.lora.experts, 1)]
        a = tuple(a_i.astype(self.dtype) for a_i, _ in pairs)
        b = tuple(b_i.astype(self.dtype) for _, b_i in pairs)
        dropout = self.lora.dropout > 0.0 and not self.deterministic
        if self.lora.merged and not dropout:
            y = merged_lora_linear(x, kernel, a, b, self.lora.scales, self.rematerialised)
            return _add_bias(y, bias, self.dtype)
        y = _add_bias(jnp.dot(x, kernel), bias, self.dtype)
        if dropout:
            x = nn.Dropout(self.lora.dropout, deterministic=False)(x)
        return y + _experts_delta(x, a, b, self.lora.scales)

    def _adalora(self, x, kernel, bias, fan_in):
        """peft's SVDLinear: ``y + s * ((dropout(x) @ (a * e)) @ b)``."""
        spec = self.lora
        a, e, b = (t.astype(self.dtype) for t in _SvdTriplet(
            fan_in, spec.init_r, self.features, self.param_dtype, name=ADALORA_KEY)())
        y = _add_bias(jnp.dot(x, kernel), bias, self.dtype)
        if spec.dropout > 0.0 and not self.deterministic:
            x = nn.Dropout(spec.dropout, deterministic=False)(x)
        return y + jnp.dot(jnp.dot(x, a * e), b) * jnp.asarray(spec.scale, self.dtype)


def _add_bias(y, bias, dtype):
    return y if bias is None else y + bias.astype(dtype)


def _experts_delta(x, a, b, scales):
    """``sum_i s_i (x a_i) b_i``; several experts go through one ``x [a_1 .. a_E]`` and one
    ``[s_1 b_1; ..; s_E b_E]`` product (the same sum), so the input is read and a ``[.., out]``
    result written once per linear rather than once per expert."""
    if len(a) == 1:
        return scales[0] * jnp.dot(jnp.dot(x, a[0]), b[0])
    h = jnp.dot(x, jnp.concatenate(a, axis=1))
    column_scales = np.repeat(np.asarray(scales, np.float32), [a_i.shape[1] for a_i in a])
    return jnp.dot(h * column_scales.astype(h.dtype), jnp.concatenate(b, axis=0))


class _LoraPair(nn.Module):
    fan_in: int
    rank: int
    features: int
    param_dtype: Dtype

    @nn.compact
    def __call__(self):
        a = self.param("a", lora_a_init, (self.fan_in, self.rank), self.param_dtype)
        b = self.param("b", nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
        return a, b


class _SvdTriplet(nn.Module):
    fan_in: int
    rank: int
    features: int
    param_dtype: Dtype

    @nn.compact
    def __call__(self):
        factor_init = nn.initializers.normal(0.02)  # peft: A, B ~ N(0, 0.02), E = 0
        a = self.param("a", factor_init, (self.fan_in, self.rank), self.param_dtype)
        e = self.param("e", nn.initializers.zeros, (self.rank,), self.param_dtype)
        b = self.param("b", factor_init, (self.rank, self.features), self.param_dtype)
        return a, e, b


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with SiLU (Qwen) or tanh-GELU (Gemma)."""

    hidden_size: int
    intermediate_size: int
    activation: str
    lora: LoraSpec | None = None
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def linear(features, name):
            return LoraLinear(features, False, self.lora, self.deterministic, self.dtype,
                              self.param_dtype, self.rematerialised, name=name)

        gate_name, up_name, down_name = MLP_PROJECTIONS
        gate = linear(self.intermediate_size, gate_name)(x)
        up = linear(self.intermediate_size, up_name)(x)
        return linear(self.hidden_size, down_name)(_ACTIVATIONS[self.activation](gate) * up)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache.

    ``ctx`` holds what all layers share (built once by the model): ``rope`` -> {'global',
    'local'} -> (cos, sin); ``mask`` -> {'global', 'local'} -> [B, 1, T, S] (XLA path);
    ``seq_lengths`` [B] (cuDNN path, right padding); ``cache_index`` (decoding).

    Attributes:
      num_heads, num_kv_heads, head_dim: N, K, H.
      scale: multiplier of q.k (HF's ``scaling``).
      qkv_bias, out_bias: biases of q/k/v and of o_proj.
      qk_norm: Gemma 3's (1+w) RMSNorm on queries and keys per head, before rotary.
      window: sliding window of local layers.
      attention_impl: ``'xla'`` (masks; any padding, any device) or ``'cudnn'`` (flash attention
        on GPU from sequence lengths; right-padded inputs without a cache only).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    scale: float
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    window: int | None = None
    attention_impl: str = "xla"
    lora: LoraSpec | None = None
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    rematerialised: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, ctx: dict, local, cache: dict | None):
        batch, length, _ = x.shape

        def linear(features, bias, name):
            return LoraLinear(features, bias, self.lora, self.deterministic, self.dtype,
                              self.param_dtype, self.rematerialised, name=name)

        q_name, k_name, v_name, o_name = ATTENTION_PROJECTIONS
        q = linear(self.num_heads * self.head_dim, self.qkv_bias, q_name)(x)
        k = linear(self.num_kv_heads * self.head_dim, self.qkv_bias, k_name)(x)
        v = linear(self.num_kv_heads * self.head_dim, self.qkv_bias, v_name)(x)
        q = q.reshape(batch, length, self.num_heads, self.head_dim)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = RMSNorm(True, self.norm_eps, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(True, self.norm_eps, self.param_dtype, name="k_norm")(k)
        rope = ctx["rope"]
        cos, sin = _select(local, rope["global"], rope.get("local", rope["global"]))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if cache is not None:
            start = (0, ctx["cache_index"], 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)

        if self.attention_impl == "cudnn" and cache is None:
            out = self._cudnn(q, k, v, ctx["seq_lengths"], local)
        else:
            masks = ctx["mask"]
            mask = _select(local, masks["global"], masks.get("local", masks["global"]))
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.scale,
                                               implementation="xla")
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return linear(self.hidden_size, self.out_bias, o_name)(out), cache

    def _cudnn(self, q, k, v, seq_lengths, local):
        def run(window):
            return jax.nn.dot_product_attention(
                q, k, v, scale=self.scale, implementation="cudnn",
                **cudnn_attention_kwargs(seq_lengths, window))

        if isinstance(local, (bool, np.bool_)):
            return run(self.window if local else None)
        return jax.lax.cond(local, lambda: run(self.window), lambda: run(None))


class DecoderBlock(nn.Module):
    """Fields every family's decoder layer shares; subclasses define ``__call__``.

    ``__call__(x, ctx, layer) -> (x, cache)``: ``layer`` holds the per-layer inputs, ``'cache'``
    (dict of k, v or None) and, when ``is_local`` is None (scanned layers of mixed kinds),
    ``'local'`` (a bool scalar).
    """

    config: Any
    lora: LoraSpec | None = None
    deterministic: bool = True
    is_local: bool | None = None
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    rematerialised: bool = False

    def local_flag(self, layer: dict):
        return self.is_local if self.is_local is not None else layer["local"]

    def norm(self, name: str, offset: bool) -> RMSNorm:
        return RMSNorm(offset, self.config.rms_norm_eps, self.param_dtype, name=name)

    def attention(self, *, scale: float, qkv_bias: bool, out_bias: bool,
                  qk_norm: bool) -> Attention:
        c = self.config
        return Attention(
            num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
            hidden_size=c.hidden_size, scale=scale, qkv_bias=qkv_bias, out_bias=out_bias,
            qk_norm=qk_norm, norm_eps=c.rms_norm_eps, window=c.sliding_window,
            attention_impl=self.attention_impl, lora=self.lora,
            deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype,
            rematerialised=self.rematerialised, name="self_attn")

    def mlp(self) -> GatedMLP:
        c = self.config
        return GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.lora,
                        self.deterministic, self.dtype, self.param_dtype, self.rematerialised,
                        name="mlp")


def head_scale(value: float) -> float:
    """``value ** -0.5`` as a Python float (HF's attention ``scaling``)."""
    return 1.0 / math.sqrt(value)
