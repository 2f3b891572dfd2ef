"""Gemma 3 text decoder (270M, 1B, and the text tower of 4B/12B/27B).

Follows transformers' ``modeling_gemma3.py``: (1 + w) RMSNorm everywhere (q/k norms included)
computed in float32, embeddings times sqrt(D) in the compute dtype, attention scale
``query_pre_attn_scalar ** -0.5``, sandwich norms around attention and MLP, tanh-GELU gated MLP,
local (sliding-window) layers with base ``rope_local_base_freq`` and global layers with
``rope_theta`` and the config's linear rope scaling (4B and larger).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from molf_jax.models.hf_config import eos_for_hf, rope_setting
from molf_jax.models.layers import DecoderBlock, head_scale
from molf_jax.models.transformer import DecoderConfig

__all__ = ["Gemma3Block", "Gemma3Config", "gemma3_layer_types"]


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """HF's default interleaving: every ``pattern``-th layer is global, the rest local."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(num_layers))


def _preset(num_layers: int, **fields) -> dict:
    base = dict(vocab_size=262_144, num_layers=num_layers, head_dim=256,
                query_pre_attn_scalar=256.0, sliding_window=512, rope_theta=1_000_000.0,
                rope_local_base_freq=10_000.0, max_position_embeddings=32_768,
                layer_types=gemma3_layer_types(num_layers), tie_word_embeddings=True,
                hidden_act="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=(1, 106),
                pad_token_id=0)
    return {**base, **fields}


# Text towers of the multimodal sizes: 262,208-token vocabulary, 1024-token window, linear rope
# scaling 8 on global layers, 128k context.
_LARGE = dict(vocab_size=262_208, sliding_window=1024, rope_scaling_factor=8.0,
              max_position_embeddings=131_072)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma3Config(DecoderConfig):
    """Gemma 3 hyper-parameters (see ``DecoderConfig``), plus:

    Attributes:
      query_pre_attn_scalar: attention scale is its inverse square root.
      rope_local_base_freq: rotary base of local layers (no scaling there).
      attention_bias: biases on q/k/v/o (False in every release).

    Example:
      >>> config = Gemma3Config.preset("gemma3-1b")
      >>> config.layer_types[4:6], config.sliding_window
      (('sliding_attention', 'full_attention'), 512)
    """

    model_type: ClassVar[str] = "gemma3_text"
    architecture: ClassVar[str] = "Gemma3ForCausalLM"
    scale_embeddings: ClassVar[bool] = True
    norm_offset: ClassVar[bool] = True
    presets: ClassVar[dict[str, dict]] = {
        "gemma3-270m": _preset(18, hidden_size=640, intermediate_size=2048, num_heads=4,
                               num_kv_heads=1),
        "gemma3-1b": _preset(26, hidden_size=1152, intermediate_size=6912, num_heads=4,
                             num_kv_heads=1),
        "gemma3-4b": _preset(34, hidden_size=2560, intermediate_size=10_240, num_heads=8,
                             num_kv_heads=4, **_LARGE),
        "gemma3-12b": _preset(48, hidden_size=3840, intermediate_size=15_360, num_heads=16,
                              num_kv_heads=8, **_LARGE),
        "gemma3-27b": _preset(62, hidden_size=5376, intermediate_size=21_504, num_heads=32,
                              num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168.0,
                              **_LARGE),
    }

    query_pre_attn_scalar: float = 256.0
    rope_local_base_freq: float = 10_000.0
    attention_bias: bool = False

    def rope(self, local: bool) -> tuple[float, float]:
        if local:
            return self.rope_local_base_freq, 1.0
        return self.rope_theta, self.rope_scaling_factor

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> Gemma3Config:
        """Builds the config from a ``Gemma3ForCausalLM`` config dict, or the ``text_config`` of
        a ``Gemma3ForConditionalGeneration`` one, with ``Gemma3TextConfig``'s defaults for absent
        keys (multimodal configs rely on them)."""
        if hf.get("model_type") == "gemma3" or "text_config" in hf:
            hf = dict(hf.get("text_config") or {})
            where = f"{where} (text_config)"
        if hf.get("attn_logit_softcapping") is not None:
            raise ValueError(f"{where}: attn_logit_softcapping is not supported (Gemma 3 "
                             "checkpoints leave it null)")
        if hf.get("use_bidirectional_attention"):
            raise ValueError(f"{where}: use_bidirectional_attention=True is not supported")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"{where}: Gemma 3 activation {act!r} is not supported")
        layers = hf.get("num_hidden_layers", 26)
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = tuple(hf.get("layer_types") or gemma3_layer_types(layers, pattern))
        theta, factor = rope_setting(hf, layer_type="full_attention",
                                     legacy_theta_key="rope_theta", default_theta=1_000_000.0,
                                     legacy_scaling=True, where=where)
        local_theta, local_factor = rope_setting(
            hf, layer_type="sliding_attention", legacy_theta_key="rope_local_base_freq",
            default_theta=10_000.0, legacy_scaling=False, where=where)
        if local_factor != 1.0:
            raise ValueError(f"{where}: rope scaling on sliding_attention layers is not "
                             "supported")
        return cls(
            vocab_size=hf.get("vocab_size", 262_208), hidden_size=hf.get("hidden_size", 2304),
            intermediate_size=hf.get("intermediate_size", 9216), num_layers=layers,
            num_heads=hf.get("num_attention_heads", 8),
            num_kv_heads=hf.get("num_key_value_heads", 4), head_dim=hf.get("head_dim", 256),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling_factor=factor, rope_local_base_freq=local_theta,
            layer_types=layer_types, sliding_window=hf.get("sliding_window", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            max_position_embeddings=hf.get("max_position_embeddings", 131_072),
            hidden_act=act, bos_token_id=hf.get("bos_token_id", 2),
            eos_token_id=hf.get("eos_token_id", 1), pad_token_id=hf.get("pad_token_id", 0),
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
            attention_bias=bool(hf.get("attention_bias", False)))

    def to_hf(self) -> dict:
        """A ``Gemma3ForCausalLM`` ``config.json`` dict that transformers 4.x and 5.x read."""
        return {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "hidden_activation": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_base_freq,
            "rope_scaling": None if self.rope_scaling_factor == 1.0 else
            {"rope_type": "linear", "factor": self.rope_scaling_factor},
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            # transformers' strict config wants an int here whenever the value is one.
            "query_pre_attn_scalar": int(self.query_pre_attn_scalar)
            if float(self.query_pre_attn_scalar).is_integer() else self.query_pre_attn_scalar,
            "attention_bias": self.attention_bias, "attn_logit_softcapping": None,
            "final_logit_softcapping": self.final_logit_softcapping,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id, "eos_token_id": eos_for_hf(self.eos_token_id),
            "pad_token_id": self.pad_token_id, "attention_dropout": 0.0, "use_cache": True,
        }


class Gemma3Block(DecoderBlock):
    """One Gemma 3 decoder layer with norms before and after both attention and MLP."""

    @nn.compact
    def __call__(self, x, ctx, layer):
        c = self.config
        h = self.norm("input_layernorm", offset=True)(x)
        attention = self.attention(scale=head_scale(c.query_pre_attn_scalar),
                                   qkv_bias=c.attention_bias, out_bias=c.attention_bias,
                                   qk_norm=True)
        h, cache = attention(h, ctx, self.local_flag(layer), layer["cache"])
        x = x + self.norm("post_attention_layernorm", offset=True)(h)
        h = self.mlp()(self.norm("pre_feedforward_layernorm", offset=True)(x))
        x = x + self.norm("post_feedforward_layernorm", offset=True)(h)
        return x, cache
