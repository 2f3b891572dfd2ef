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
adalora  one SVD triplet (init rank)  the triplets                        AdamW (LoRA lr/wd)
                                                                          in adalora_allocate
=======  ===========================  ==================================  ====================

Biases and norm scales take no weight decay in every mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from molf_jax.adalora import AdaLoraSpec, adalora_allocate, orth_regularizer
from molf_jax.lora import LoraExpert, LoraSpec
from molf_jax.param_roles import (FFT, FFT_NO_DECAY, LORA, expert_labels, optimizer_groups,
                                  param_roles)
from molf_jax.routing import molf_adamw, molf_gate
from molf_jax.train.config import FFT_EXPERT_MODES, TrainConfig, check_adalora_schedule
from molf_jax.train.platform import with_platform_defaults

__all__ = ["lora_spec", "mode_roles", "make_schedule", "build_optimizer", "loss_regularizer"]


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


def mode_roles(config: TrainConfig, params: Any) -> Any:
    """The role of every leaf (`molf_jax.param_roles.ParamRole`) in this mode: what trains,
    as the table above says, which expert each leaf is, and its AdamW group.

    Example:
      >>> roles = mode_roles(TrainConfig(mode="molfe"), params)           # doctest: +SKIP
      >>> trainable, frozen = split_trainable(params, roles)
    """
    trains_base = config.mode == "fft" or config.mode in FFT_EXPERT_MODES
    trains_others = trains_base or (config.mode == "molfe" and config.train_embeddings_norms)
    return param_roles(params, train_base=trains_base, train_others=trains_others)


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


def build_optimizer(config: TrainConfig, total_steps: int, roles: Any,
                    max_grad_norm: float | None = 1.0, *,
                    peak_rates: tuple[Any, Any] | None = None
                    ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """The mode's optimizer over the trainable tree, and its schedules by group name.

    ``roles`` (`mode_roles`) give the routing labels and the AdamW group of each leaf.
    ``peak_rates`` = ``(fft, lora)`` replaces the config's two peak rates; they may be traced
    values, so one compiled step serves every rate of a sweep
    (`molf_jax.experiments.train_members`).
    """
    fft_peak, lora_peak = peak_rates or (config.fft_lr, config.lora_learning_rate)
    fft_lr = make_schedule(config, fft_peak, total_steps)
    lora_lr = make_schedule(config, lora_peak, total_steps)
    numerics = with_platform_defaults(config)
    # optax keeps nu in the parameters' dtype; mu follows state_dtype when it differs.
    mu_dtype = None if numerics.state_dtype == numerics.param_dtype else numerics.state_dtype

    def adamw(lr, wd):
        return optax.adamw(lr, weight_decay=wd, mu_dtype=mu_dtype)

    labels, groups = expert_labels(roles), optimizer_groups(roles)
    if config.mode == "adalora":
        # peft trains every factor with one AdamW; the allocator wraps it.
        tx = adalora_allocate(adamw(lora_lr, config.lora_weight_decay),
                              check_adalora_schedule(config, total_steps))
    elif config.mode in ("molf", "molfe"):
        tx = molf_adamw(labels, fft_learning_rate=fft_lr, lora_learning_rate=lora_lr,
                        fft_weight_decay=config.fft_weight_decay,
                        lora_weight_decay=config.lora_weight_decay, mu_dtype=mu_dtype,
                        top_k=config.routing_top_k, score=config.score, groups=groups)
    else:
        tx = optax.partition({FFT: adamw(fft_lr, config.fft_weight_decay),
                              FFT_NO_DECAY: adamw(fft_lr, 0.0),
                              LORA: adamw(lora_lr, config.lora_weight_decay)}, groups)
        if config.mode == "molf_gate":
            tx = optax.chain(molf_gate(labels, top_k=config.routing_top_k), tx)
    if max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx, {"fft": fft_lr, "lora": lora_lr}


def loss_regularizer(config: TrainConfig) -> Callable[[Any], jax.Array] | None:
    """What the mode adds to the loss: AdaLoRA's weighted orthogonality penalty, else None."""
    if config.mode != "adalora" or config.orth_reg_weight == 0:
        return None
    return lambda params: config.orth_reg_weight * orth_regularizer(params)

