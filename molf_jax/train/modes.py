"""The training modes: which LoRA experts exist, which leaves train, which optimizer.

=======  ===========================  ==================================  ====================
mode     LoRA experts                 trainable                           optimizer
=======  ===========================  ==================================  ====================
fft      none                         everything                          AdamW (FFT lr/wd)
lora     one rank                     LoRA leaves                         AdamW (LoRA lr/wd)
molf     ranks (default 128)          everything                          molf_adamw, routed
molfe    two+ ranks (default 16,128)  LoRA leaves (+ embeddings, norms    molf_adamw, routed
                                      and non-target params with           between LoRA experts
                                      ``train_embeddings_norms``)
molf_    ranks (default 128)          everything                          molf_gate chained
gate                                                                      before AdamW
=======  ===========================  ==================================  ====================

Biases and norm scales take no weight decay in every mode.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import optax

from molf_jax.adalora import (AdaLoraSpec, adalora_allocate, is_adalora_path,
                              orth_regularizer)
from molf_jax.lora import LoraExpert, LoraSpec
from molf_jax.routing import (default_no_decay, label_lora_experts, molf_adamw, molf_gate,
                              path_to_str)
from molf_jax.train.config import FFT_EXPERT_MODES, TrainConfig, check_adalora_schedule
from molf_jax.train.platform import with_platform_defaults

__all__ = ["lora_spec", "is_trainable", "make_schedule", "build_optimizer", "loss_regularizer"]

_LORA_LEVEL = re.compile(r"(^|/)lora_\d+/")


def lora_spec(config: TrainConfig) -> LoraSpec | AdaLoraSpec | None:
    """The LoRA experts (or AdaLoRA triplets) a mode adds to every target linear (None for
    fft)."""
    if config.mode == "fft":
        return None
    if config.mode == "adalora":
        return AdaLoraSpec(init_r=config.ranks[0], alpha=config.alphas[0],
                           targets=tuple(config.lora_targets), dropout=config.lora_dropout)
    experts = tuple(LoraExpert(r, a) for r, a in zip(config.ranks, config.alphas))
    return LoraSpec(experts=experts, targets=tuple(config.lora_targets), rslora=config.rslora,
                    dropout=config.lora_dropout,
                    merged=config.merged_lora and config.mode in FFT_EXPERT_MODES)


def is_lora_path(path: str) -> bool:
    return _LORA_LEVEL.search(path) is not None


def is_trainable(config: TrainConfig, target_linears: set[str]) -> Callable[[str], bool]:
    """``path -> bool``: whether a leaf trains in this mode.

    Args:
      target_linears: module paths that carry LoRA experts (their kernel and bias are the base
        that MoLF-Efficient freezes).
    """
    if config.mode == "fft" or config.mode in FFT_EXPERT_MODES:
        return lambda path: True
    if config.mode == "adalora":
        return is_adalora_path
    if config.mode == "lora" or not config.train_embeddings_norms:
        return is_lora_path

    def molfe_with_extras(path: str) -> bool:
        if is_lora_path(path):
            return True
        module = path.rsplit("/", 1)[0]
        return module not in target_linears

    return molfe_with_extras


def make_schedule(config: TrainConfig, peak: float, total_steps: int) -> optax.Schedule:
    """Warm-up over ``warmup_ratio`` of the optimizer steps, then cosine or linear to zero.

    The warm-up is ``ceil(warmup_ratio * total_steps)`` steps, as the authors' HF Trainer
    counts it (0.1 of 24 steps: 3).
    """
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
    else:
        decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def build_optimizer(config: TrainConfig, total_steps: int,
                    max_grad_norm: float | None = 1.0) -> tuple[optax.GradientTransformation,
                                                                dict[str, optax.Schedule]]:
    """The mode's optimizer over the trainable tree, and its schedules by group name."""
    fft_lr = make_schedule(config, config.fft_lr, total_steps)
    lora_lr = make_schedule(config, config.lora_learning_rate, total_steps)
    numerics = with_platform_defaults(config)
    # optax keeps nu in the parameters' dtype; mu follows state_dtype when it differs.
    mu_dtype = None if numerics.state_dtype == numerics.param_dtype else numerics.state_dtype

    def adamw(lr, wd):
        return optax.adamw(lr, weight_decay=wd, mu_dtype=mu_dtype)

    def groups(params) -> Any:
        return jax.tree_util.tree_map_with_path(lambda p, _: _group(path_to_str(p)), params)

    if config.mode == "adalora":
        # peft trains every factor with one AdamW; the allocator wraps it.
        tx = adalora_allocate(adamw(lora_lr, config.lora_weight_decay),
                              check_adalora_schedule(config, total_steps))
    elif config.mode in ("molf", "molfe"):
        tx = molf_adamw(label_lora_experts, fft_learning_rate=fft_lr, lora_learning_rate=lora_lr,
                        fft_weight_decay=config.fft_weight_decay,
                        lora_weight_decay=config.lora_weight_decay, mu_dtype=mu_dtype,
                        top_k=config.routing_top_k, score=config.score)
    else:
        tx = optax.partition({"fft": adamw(fft_lr, config.fft_weight_decay),
                              "fft_no_decay": adamw(fft_lr, 0.0),
                              "lora": adamw(lora_lr, config.lora_weight_decay)}, groups)
        if config.mode == "molf_gate":
            tx = optax.chain(molf_gate(label_lora_experts, top_k=config.routing_top_k), tx)
    if max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx, {"fft": fft_lr, "lora": lora_lr}


def loss_regularizer(config: TrainConfig) -> Callable[[Any], jax.Array] | None:
    """What the mode adds to the loss: AdaLoRA's weighted orthogonality penalty, else None."""
    if config.mode != "adalora" or config.orth_reg_weight == 0:
        return None
    return lambda params: config.orth_reg_weight * orth_regularizer(params)


def _group(path: str) -> str:
    if is_lora_path(path):
        return "lora"
    return "fft_no_decay" if default_no_decay(path) else "fft"
