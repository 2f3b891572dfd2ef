"""HF tensor names of Qwen2 checkpoints -> Flax parameter paths.

Each row: (HF name, Flax path, transpose). ``{i}`` is the layer index; with scanned layers the
``{i}/`` level of the Flax path disappears and the layers stack on a leading axis. torch
``nn.Linear`` stores ``weight`` [out, in], our kernels are [in, out], hence the transposes.
Rows whose Flax path the model lacks (``lm_head`` when embeddings are tied) are skipped.
"""

from molf_jax.projections import ATTENTION_PROJECTIONS, MLP_PROJECTIONS

_LINEARS = (*(f"self_attn.{p}" for p in ATTENTION_PROJECTIONS),
            *(f"mlp.{p}" for p in MLP_PROJECTIONS))
_NORMS = ("input_layernorm", "post_attention_layernorm")

PARAM_TABLE = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    *((f"model.layers.{{i}}.{m}.weight", f"layers/{{i}}/{m.replace('.', '/')}/kernel", True)
      for m in _LINEARS),
    *((f"model.layers.{{i}}.self_attn.{p}.bias", f"layers/{{i}}/self_attn/{p}/bias", False)
      for p in ATTENTION_PROJECTIONS[:3]),
    *((f"model.layers.{{i}}.{n}.weight", f"layers/{{i}}/{n}/scale", False) for n in _NORMS),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)
