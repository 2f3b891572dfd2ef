"""AdaLoRA (Zhang et al., ICLR 2023) in JAX, step for step as peft implements it.

SVD-form adapters ``W + s * (a * e) @ b`` on the target linears, an orthogonality penalty for
the loss, and the rank allocator as an optax wrapper around the inner AdamW.

Example:
  >>> import jax, numpy as np, optax
  >>> params = {"q_proj": {"kernel": np.zeros((16, 8), np.float32)}}
  >>> params = add_adalora(params, AdaLoraSpec(init_r=4, alpha=8), jax.random.key(0))
  >>> tx = adalora_allocate(optax.adamw(5e-4), AdaLoraSchedule(total_step=1000, target_r=2))
  >>> float(orth_regularizer(params)) >= 0.0   # added to the loss with a weight (peft's 0.5)
  True
"""

# Adapters
from molf_jax.adalora._adapters import (
    ADALORA_KEY,
    AdaLoraSpec,
    add_adalora,
    adalora_triplets,
    delta_kernel,
    merge_adalora,
    orth_regularizer,
    strip_adalora,
)

# Rank allocator
from molf_jax.adalora._allocator import (
    AdaLoraAllocatorState,
    AdaLoraSchedule,
    adalora_allocate,
    apply_rank_pattern,
    find_allocator_state,
    rank_counts,
    rank_module_names,
    rank_pattern,
)

__all__ = [
    "ADALORA_KEY",
    "AdaLoraAllocatorState",
    "AdaLoraSchedule",
    "AdaLoraSpec",
    "adalora_allocate",
    "adalora_triplets",
    "add_adalora",
    "apply_rank_pattern",
    "delta_kernel",
    "find_allocator_state",
    "merge_adalora",
    "orth_regularizer",
    "rank_counts",
    "rank_module_names",
    "rank_pattern",
    "strip_adalora",
]
