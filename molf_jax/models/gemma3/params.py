"""HF tensor names of Gemma 3 text checkpoints -> Flax parameter paths.

Each row: (HF name, Flax path, transpose); see ``qwen2/params.py`` for the conventions. Norm
weights are stored as HF stores them (the ``w`` of ``1 + w``), so no offset is applied here.
Multimodal checkpoints name the text tower ``model.language_model.*`` (5.x) or
``language_model.model.*`` (4.x); the loader maps those prefixes onto ``model.*``.
"""

from molf_jax.projections import ATTENTION_PROJECTIONS, MLP_PROJECTIONS

_LINEARS = (*(f"self_attn.{p}" for p in ATTENTION_PROJECTIONS),
            *(f"mlp.{p}" for p in MLP_PROJECTIONS))
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
          "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")

PARAM_TABLE = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    *((f"model.layers.{{i}}.{m}.weight", f"layers/{{i}}/{m.replace('.', '/')}/kernel", True)
      for m in _LINEARS),
    *((f"model.layers.{{i}}.self_attn.{p}.bias", f"layers/{{i}}/self_attn/{p}/bias", False)
      for p in ATTENTION_PROJECTIONS),
    *((f"model.layers.{{i}}.{n}.weight", f"layers/{{i}}/{n.replace('.', '/')}/scale", False)
      for n in _NORMS),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)
