"""molf_jax: MoLF, optimizer-level routing between full fine-tuning and LoRA experts, in JAX."""

from molf_jax.routing import (
    ExpertLabel,
    MolfRouteState,
    Score,
    label_lora_experts,
    labels_from_paths,
    molf_adamw,
    molf_gate,
    molf_route,
    routing_table,
)

__version__ = "0.1.0"

__all__ = [
    "ExpertLabel",
    "MolfRouteState",
    "Score",
    "label_lora_experts",
    "labels_from_paths",
    "molf_adamw",
    "molf_gate",
    "molf_route",
    "routing_table",
]
