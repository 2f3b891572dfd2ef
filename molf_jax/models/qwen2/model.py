"""Qwen2 / Qwen2.5 decoder: pre-norm RMSNorm, rotary, q/k/v biases, GQA, SwiGLU.

Follows transformers' ``modeling_qwen2.py``: attention scale ``head_dim ** -0.5``, no o_proj
bias, sliding windows only when ``use_sliding_window`` (off in every Qwen2.5 release) and then on
layers ``>= max_window_layers``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from molf_jax.models.hf_config import eos_for_hf, rope_setting
from molf_jax.models.layers import DecoderBlock, head_scale
from molf_jax.models.transformer import DecoderConfig

__all__ = ["Qwen2Block", "Qwen2Config"]

_QWEN25 = dict(vocab_size=151_936, rms_norm_eps=1e-6, rope_theta=1_000_000.0, bos_token_id=151_643,
               eos_token_id=(151_643,), hidden_act="silu", attention_bias=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen2Config(DecoderConfig):
    """Qwen2 hyper-parameters (see ``DecoderConfig``), plus:

    Attributes:
      attention_bias: q, k and v projections carry biases (True for every Qwen2 checkpoint).

    Example:
      >>> Qwen2Config.preset("qwen2.5-1.5b").num_layers
      28
    """

    model_type: ClassVar[str] = "qwen2"
    architecture: ClassVar[str] = "Qwen2ForCausalLM"
    presets: ClassVar[dict[str, dict]] = {
        "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_layers=24,
                             num_heads=14, num_kv_heads=2, head_dim=64, tie_word_embeddings=True,
                             max_position_embeddings=32_768),
        "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_layers=28,
                             num_heads=12, num_kv_heads=2, head_dim=128, tie_word_embeddings=True,
                             max_position_embeddings=131_072),
        "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11_008, num_layers=36,
                           num_heads=16, num_kv_heads=2, head_dim=128, tie_word_embeddings=True,
                           max_position_embeddings=32_768),
        "qwen2.5-7b": dict(_QWEN25, vocab_size=152_064, hidden_size=3584,
                           intermediate_size=18_944, num_layers=28, num_heads=28, num_kv_heads=4,
                           head_dim=128, tie_word_embeddings=False,
                           max_position_embeddings=131_072),
    }

    attention_bias: bool = True

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> Qwen2Config:
        """Builds the config from a ``Qwen2ForCausalLM`` config dict (4.x or 5.x spelling),
        with ``Qwen2Config``'s defaults for absent keys."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: Qwen2 hidden_act {hf['hidden_act']!r} is not supported")
        heads = hf.get("num_attention_heads", 32)
        hidden = hf.get("hidden_size", 4096)
        layers = hf.get("num_hidden_layers", 32)
        use_window = bool(hf.get("use_sliding_window", False))
        window = hf.get("sliding_window", 4096) if use_window else None
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
            else "full_attention" for i in range(layers)]
        theta, factor = rope_setting(hf, layer_type=None, legacy_theta_key="rope_theta",
                                     default_theta=10_000.0, legacy_scaling=True, where=where)
        return cls(
            vocab_size=hf.get("vocab_size", 151_936), hidden_size=hidden,
            intermediate_size=hf.get("intermediate_size", 22_016), num_layers=layers,
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling_factor=factor, layer_types=tuple(layer_types),
            sliding_window=window if "sliding_attention" in layer_types else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 32_768),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"), attention_bias=True)

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers 4.x and 5.x both read."""
        sliding = any(self.layer_is_local)
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "hidden_act": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling_factor == 1.0 else
            {"rope_type": "linear", "factor": self.rope_scaling_factor},
            "use_sliding_window": sliding, "sliding_window": self.sliding_window,
            "max_window_layers": self.layer_is_local.index(True) if sliding else self.num_layers,
            "layer_types": list(self.layer_types),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos_for_hf(self.eos_token_id), "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0, "use_cache": True,
        }


class Qwen2Block(DecoderBlock):
    """One Qwen2 decoder layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    @nn.compact
    def __call__(self, x, ctx, layer):
        c = self.config
        h = self.norm("input_layernorm", offset=False)(x)
        attention = self.attention(scale=head_scale(c.head_dim), qkv_bias=c.attention_bias,
                                   out_bias=False, qk_norm=False)
        h, cache = attention(h, ctx, self.local_flag(layer), layer["cache"])
        x = x + h
        x = x + self.mlp()(self.norm("post_attention_layernorm", offset=False)(x))
        return x, cache
