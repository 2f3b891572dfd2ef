"""The decoder block's linear projections, named as in HF checkpoints.

One home for the names that the models give their submodules (`molf_jax.models.layers`), that
LoRA targets by default (`molf_jax.lora.default_targets`, docs/design.md section 1) and that the
routing figures use as rows, in this order. It imports nothing, so every layer may read it.

Example:
  >>> PROJECTIONS == ATTENTION_PROJECTIONS + MLP_PROJECTIONS
  True
"""

__all__ = ["ATTENTION_PROJECTIONS", "MLP_PROJECTIONS", "PROJECTIONS"]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
