"""The training modes as a registry: one `Mode` object per mode, asked by the rest of the library.

=======  ===========================  ==================================  ====================
mode     LoRA experts                 trainable                           optimizer
=======  ===========================  ==================================  ====================
fft      none                         everything                          AdamW (FFT lr/wd)
lora     one rank (default 32)        LoRA leaves                         AdamW (LoRA lr/wd)
molf     ranks (default 128)          everything                          molf_adamw, routed
molfe    two+ ranks (default 32,128)  LoRA leaves (+ embeddings, norms    molf_adamw, routed
                                      and non-target params with           between LoRA experts
                                      ``train_embeddings_norms``)
molf_    ranks (default 128)          everything                          molf_gate chained
gate                                                                      before AdamW
adalora  one SVD triplet (init rank)  the triplets                        AdamW (LoRA lr/wd)
                                                                          in adalora_allocate
=======  ===========================  ==================================  ====================

Biases and norm scales take no weight decay in every mode. This is the one file that tells the
modes apart by name; everything else asks the mode object (`mode_of`).

Example:
  >>> mode_of("molfe").routes, mode_of("molfe").fft_expert, mode_of("fft").adapter
  (True, False, 'none')
  >>> [name for name, mode in MODES.items() if mode.routes]
  ['molf', 'molfe', 'molf_gate']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from molf_jax.adalora import AdaLoraSchedule, AdaLoraSpec, adalora_allocate, orth_regularizer
from molf_jax.lora import LoraExpert, LoraSpec, expert_key
from molf_jax.param_roles import (FFT, FFT_NO_DECAY, LORA, expert_labels, optimizer_groups,
                                  param_roles)
from molf_jax.routing import molf_adamw, molf_gate
from molf_jax.train.errors import ConfigError

__all__ = ["MODES", "ROUTED_MODES", "FFT_EXPERT_MODES", "Mode", "Recipe", "mode_of",
           "lora_spec", "mode_roles", "make_schedule", "build_optimizer", "loss_regularizer",
           "adalora_schedule", "ROUTED_ALPHA", "ADALORA_ALPHA", "baseline_alpha"]

# The authors' recipe (arXiv 2605.07111 and their published code), per mode, used wherever a
# setting is left at None. Sources, one per value:
# - ranks: MoLF's one r128 expert (their config default); MoLF-E ranks 32 and 128 (their
#   MoLF-E quickstart); LoRA baseline r32 (their baseline scripts).
#   AdaLoRA: peft's AdaLoraConfig init_r 12 (every module's rank before pruning, --init-r).
# - alpha: routed experts 32 with rsLoRA (their config default; s = 32 / sqrt(r)). The LoRA
#   baseline follows their scripts' rsLoRA rule alpha = round(2 sqrt(r)) (r 32 -> 11).
ROUTED_ALPHA = 32.0
#   AdaLoRA: peft's LoraConfig default 8 (its scale is alpha / init_r, no rsLoRA).
ADALORA_ALPHA = 8.0
# - LoRA learning rate: MoLF and MoLF-E use the FFT rate, 5e-5 (their README quickstart: EPD
#   multiplies each expert's score by its rate, so unequal rates bias the routing); the LoRA
#   baseline takes 5e-4, the first value of their sweep {5e-4, 5e-5}. FFT: 5e-5, the middle
#   of their sweep {1e-4, 5e-5, 2e-5} and their MoLF quickstart's rate. AdaLoRA, the other
#   adapter baseline, takes the LoRA baseline's rate.
# - top-k: MoLF top-1 (paper default); MoLF-E top-2 (their MoLF-E quickstart).
# Warm-up ratio 0.1 (warm-up = ceil(0.1 x steps), as their HF Trainer counts it), weight decay
# 0.1 / 0.01, dropout 0.05, cosine: TrainConfig's field defaults. Their effective batch is 32
# (8 x grad-accum 4) for 2 epochs; the CLI keeps 8 x 1 so that the main job runs in minutes on
# a CPU (`--grad-accum 4` gives theirs; the reproduction does).


def baseline_alpha(rank: int) -> float:
    """The authors' LoRA-baseline alpha for a rank: round(2 sqrt(r)).

    Example:
      >>> baseline_alpha(32)
      11.0
    """
    return float(round(2 * rank ** 0.5))


class Recipe(NamedTuple):
    """The mode's settings for one config: the ones given, the authors' where left None."""

    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    lora_lr: float
    top_k: int


@dataclasses.dataclass(frozen=True)
class Mode:
    """One training mode: which experts it adds, which leaves train, its optimizer, its
    regulariser, whether it routes, and the authors' recipe for it.

    Attributes:
      name: the ``--mode`` value.
      adapter: what it adds beside every target linear: ``'none'``, ``'lora'`` (LoRA experts)
        or ``'adalora'`` (one AdaLoRA triplet).
      fft_expert: the targeted linears' base kernels and biases train, as expert 0 of each
        routed module (MoLF) or as plain AdamW leaves (fft).
      routes: the optimizer routes each module's update among its experts (and logs it).
      gated: routing is the approximate form, gradients gated before a stock AdamW.
      default_ranks, default_lora_lr, default_top_k: the authors' recipe (see the source).
    """

    name: str
    adapter: str
    fft_expert: bool
    routes: bool
    default_ranks: tuple[int, ...]
    default_lora_lr: float
    default_top_k: int = 1
    gated: bool = False

    def experts_per_module(self, ranks: int) -> int:
        """Routed experts per module: the LoRA experts, and the FFT expert where it routes."""
        return ranks + (1 if self.fft_expert and self.routes else 0)

    def recipe(self, config: Any) -> Recipe:
        """The ranks, alphas, LoRA rate and top-k of ``config`` in this mode."""
        if self.adapter == "adalora":
            ranks = (config.init_r,) if config.init_r is not None else self.default_ranks
            alphas = (ADALORA_ALPHA if config.lora_alpha is None else float(config.lora_alpha[0]),)
        else:
            ranks = (tuple(config.lora_ranks) if config.lora_ranks is not None
                     else self.default_ranks)
            if config.lora_alpha is None:
                alphas = tuple(ROUTED_ALPHA if self.routes else baseline_alpha(r) for r in ranks)
            elif len(config.lora_alpha) == 1:
                alphas = tuple(float(config.lora_alpha[0]) for _ in ranks)
            else:
                alphas = tuple(float(a) for a in config.lora_alpha)
        return Recipe(ranks=ranks, alphas=alphas,
                      lora_lr=self.default_lora_lr if config.lora_lr is None else config.lora_lr,
                      top_k=self.default_top_k if config.top_k is None else config.top_k)

    def resolved_fields(self, config: Any) -> dict[str, Any]:
        """The `TrainConfig` fields that hold this mode's recipe, filled in."""
        recipe = self.recipe(config)
        fields = dict(lora_alpha=recipe.alphas, lora_lr=recipe.lora_lr, top_k=recipe.top_k)
        if self.adapter == "adalora":  # the rank is --init-r (--lora-ranks is refused)
            return {**fields, "init_r": recipe.ranks[0]}
        return {**fields, "lora_ranks": recipe.ranks}

    def check(self, config: Any) -> None:
        """ConfigError for settings this mode cannot run with."""
        ranks = self.recipe(config).ranks

        def need(ok: bool, message: str):
            if not ok:
                raise ConfigError(message)

        need(all(isinstance(r, int) and r > 0 for r in ranks),
             f"LoRA ranks must be positive integers, got {list(ranks)}")
        if self.name == "lora":
            need(len(ranks) == 1, f"mode 'lora' takes one rank, got {list(ranks)}")
        if self.name == "molfe":
            need(len(ranks) >= 2, f"mode 'molfe' routes between LoRA experts: give two or more "
                                  f"ranks, got {list(ranks)}")
        elif self.adapter == "lora":
            need(len(ranks) >= 1, f"mode {self.name!r} needs at least one LoRA rank")
        if self.adapter == "adalora":
            need(config.lora_ranks is None, "mode 'adalora' takes --init-r and --target-r, not "
                                            "--lora-ranks")
            need(config.lora_alpha is None or len(config.lora_alpha) == 1,
                 f"mode 'adalora' takes one --lora-alpha, got {list(config.lora_alpha or ())}")
            need(config.orth_reg_weight >= 0,
                 f"orth-reg-weight must be >= 0, got {config.orth_reg_weight}")
            adalora_schedule(config, config.steps)
        elif config.lora_alpha is not None:
            need(len(config.lora_alpha) in (1, len(ranks)),
                 f"give one LoRA alpha or one per rank ({len(ranks)}), got "
                 f"{list(config.lora_alpha)}")
        if self.routes:
            experts = self.experts_per_module(len(ranks))
            top_k = self.recipe(config).top_k
            need(isinstance(top_k, int) and 1 <= top_k <= experts,
                 f"top-k must be between 1 and the number of experts per module ({experts}), "
                 f"got {top_k}")

    def lora_spec(self, config: Any) -> LoraSpec | AdaLoraSpec | None:
        """The LoRA experts (or AdaLoRA triplets) this mode adds to every target linear."""
        recipe = self.recipe(config)
        if self.adapter == "none":
            return None
        if self.adapter == "adalora":
            return AdaLoraSpec(init_r=recipe.ranks[0], alpha=recipe.alphas[0],
                               targets=tuple(config.lora_targets), dropout=config.lora_dropout)
        experts = tuple(LoraExpert(r, a) for r, a in zip(recipe.ranks, recipe.alphas))
        # The merged kernel pays off only where the base kernel trains beside the experts.
        return LoraSpec(experts=experts, targets=tuple(config.lora_targets),
                        rslora=config.rslora, dropout=config.lora_dropout,
                        merged=config.merged_lora and self.fft_expert)

    def roles(self, config: Any, params: Any) -> Any:
        """Every leaf's `molf_jax.param_roles.ParamRole` in this mode."""
        trains_others = self.fft_expert or (self.name == "molfe" and
                                            config.train_embeddings_norms)
        return param_roles(params, train_base=self.fft_expert, train_others=trains_others)

    def optimizer(self, config: Any, total_steps: int, roles: Any,
                  max_grad_norm: float | None = 1.0, *,
                  peak_rates: tuple[Any, Any] | None = None):
        """The mode's optimizer over the trainable tree, and its schedules by group name;
        ``peak_rates`` as `build_optimizer`'s."""
        if config.state_dtype is None or config.param_dtype is None:
            raise ConfigError("the optimizer needs a resolved config (its state dtype): pass "
                              "molf_jax.train.resolve_config(config)")
        recipe = self.recipe(config)
        fft_peak, lora_peak = peak_rates or (config.fft_lr, recipe.lora_lr)
        fft_lr = make_schedule(config, fft_peak, total_steps)
        lora_lr = make_schedule(config, lora_peak, total_steps)
        # optax keeps nu in the parameters' dtype; mu follows state_dtype when it differs.
        mu_dtype = None if config.state_dtype == config.param_dtype else config.state_dtype

        def adamw(lr, wd):
            return optax.adamw(lr, weight_decay=wd, mu_dtype=mu_dtype)

        labels, groups = expert_labels(roles), optimizer_groups(roles)
        if self.adapter == "adalora":
            # peft trains every factor with one AdamW; the allocator wraps it.
            tx = adalora_allocate(adamw(lora_lr, config.lora_weight_decay),
                                  adalora_schedule(config, total_steps))
        elif self.routes and not self.gated:
            tx = molf_adamw(labels, fft_learning_rate=fft_lr, lora_learning_rate=lora_lr,
                            fft_weight_decay=config.fft_weight_decay,
                            lora_weight_decay=config.lora_weight_decay, mu_dtype=mu_dtype,
                            top_k=recipe.top_k, score=config.score, groups=groups)
        else:
            tx = optax.partition({FFT: adamw(fft_lr, config.fft_weight_decay),
                                  FFT_NO_DECAY: adamw(fft_lr, 0.0),
                                  LORA: adamw(lora_lr, config.lora_weight_decay)}, groups)
            if self.gated:
                tx = optax.chain(molf_gate(labels, top_k=recipe.top_k), tx)
        if max_grad_norm:
            tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
        return tx, {"fft": fft_lr, "lora": lora_lr}

    def regularizer(self, config: Any) -> Callable[[Any], jax.Array] | None:
        """What the mode adds to the loss: AdaLoRA's weighted orthogonality penalty, else
        None."""
        if self.adapter != "adalora" or config.orth_reg_weight == 0:
            return None
        return lambda params: config.orth_reg_weight * orth_regularizer(params)

    def dropout(self, config: Any) -> bool:
        """Whether the step draws dropout masks (only adapters have dropout)."""
        return self.adapter != "none" and config.lora_dropout > 0

    def expert_names(self, config: Any) -> list[str]:
        """The routing log's column names: the FFT expert, then each LoRA expert and its rank.
        """
        return ["fft"] + [f"{expert_key(i)} (r={r})"
                          for i, r in enumerate(self.recipe(config).ranks, start=1)]

    def adapter_refusal(self, moved: list[str]) -> str:
        """Why a run of this mode cannot leave a LoRA adapter, given the non-adapter leaves it
        trained (``moved``, at least one)."""
        reason = (f"{self.name} trains the base kernels (its FFT expert)" if self.fft_expert
                  else f"the {self.name} run also trained {len(moved)} non-LoRA parameters "
                       f"(e.g. {moved[0]}; train_embeddings_norms)")
        return f"{reason}, which a LoRA adapter cannot carry; use the merged folder"


MODES: dict[str, Mode] = {mode.name: mode for mode in (
    Mode("fft", adapter="none", fft_expert=True, routes=False, default_ranks=(),
         default_lora_lr=5e-4),
    Mode("lora", adapter="lora", fft_expert=False, routes=False, default_ranks=(32,),
         default_lora_lr=5e-4),
    Mode("molf", adapter="lora", fft_expert=True, routes=True, default_ranks=(128,),
         default_lora_lr=5e-5),
    Mode("molfe", adapter="lora", fft_expert=False, routes=True, default_ranks=(32, 128),
         default_lora_lr=5e-5, default_top_k=2),
    Mode("molf_gate", adapter="lora", fft_expert=True, routes=True, gated=True,
         default_ranks=(128,), default_lora_lr=5e-5),
    Mode("adalora", adapter="adalora", fft_expert=False, routes=False, default_ranks=(12,),
         default_lora_lr=5e-4),
)}
# Modes whose optimizer routes between experts (they log routing), and those with an FFT expert.
ROUTED_MODES = tuple(name for name, mode in MODES.items() if mode.routes)
FFT_EXPERT_MODES = tuple(name for name, mode in MODES.items() if mode.routes and mode.fft_expert)


def mode_of(config_or_name: Any) -> Mode:
    """The `Mode` of a config (or of a mode name)."""
    name = getattr(config_or_name, "mode", config_or_name)
    try:
        return MODES[name]
    except KeyError:
        raise ConfigError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}") from None


def lora_spec(config: Any) -> LoraSpec | AdaLoraSpec | None:
    """The LoRA experts (or AdaLoRA triplets) a mode adds to every target linear (None for
    fft).

    Example:
      >>> from molf_jax.train import TrainConfig
      >>> [e.rank for e in lora_spec(TrainConfig(mode="molfe")).experts]
      [32, 128]
    """
    return mode_of(config).lora_spec(config)


def mode_roles(config: Any, params: Any) -> Any:
    """The role of every leaf (`molf_jax.param_roles.ParamRole`) in this mode: what trains,
    as the table above says, which expert each leaf is, and its AdamW group.

    Example:
      >>> import numpy as np
      >>> from molf_jax.train import TrainConfig, split_trainable
      >>> params = {"q_proj": {"kernel": np.ones((4, 4)),
      ...           "lora_1": {"a": np.ones((4, 2)), "b": np.zeros((2, 4))}}}
      >>> trainable, frozen = split_trainable(params, mode_roles(TrainConfig(mode="lora"), params))
      >>> list(trainable["q_proj"]), list(frozen["q_proj"])
      (['lora_1'], ['kernel'])
    """
    return mode_of(config).roles(config, params)


def make_schedule(config: Any, peak: float, total_steps: int) -> optax.Schedule:
    """Warm-up over ``warmup_ratio`` of the optimizer steps, then cosine or linear to zero.

    The warm-up is ``ceil(warmup_ratio * total_steps)`` steps, as the authors' HF Trainer
    counts it (0.1 of 24 steps: 3).

    Example:
      >>> from molf_jax.train import TrainConfig
      >>> [float(make_schedule(TrainConfig(), 1.0, 24)(s)) for s in (0, 3)]
      [0.0, 1.0]
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


def build_optimizer(config: Any, total_steps: int, roles: Any,
                    max_grad_norm: float | None = 1.0, *,
                    peak_rates: tuple[Any, Any] | None = None
                    ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """The mode's optimizer over the trainable tree, and its schedules by group name.

    ``config`` is resolved (`molf_jax.train.resolve_config`: its numerics name the optimizer
    states' dtype); ``roles`` (`mode_roles`) give the routing labels and the AdamW group of
    each leaf. ``peak_rates`` = ``(fft, lora)`` replaces the config's two peak rates; they may
    be traced values, so one compiled step serves every rate of a sweep
    (`molf_jax.experiments.train_members`).
    """
    return mode_of(config).optimizer(config, total_steps, roles, max_grad_norm,
                                     peak_rates=peak_rates)


def loss_regularizer(config: Any) -> Callable[[Any], jax.Array] | None:
    """What the mode adds to the loss: AdaLoRA's weighted orthogonality penalty, else None."""
    return mode_of(config).regularizer(config)


def adalora_schedule(config: Any, total_steps: int | None) -> AdaLoraSchedule:
    """The AdaLoRA schedule for ``total_steps`` optimizer steps (None: all but the fit with the
    step count is checked), or ConfigError with peft's reason."""
    try:
        return AdaLoraSchedule(
            total_step=total_steps if total_steps is not None else config.tinit + config.tfinal + 1,
            init_r=mode_of("adalora").recipe(config).ranks[0], target_r=config.target_r,
            tinit=config.tinit, tfinal=config.tfinal, deltaT=config.delta_t,
            beta1=config.beta1, beta2=config.beta2)
    except ValueError as err:
        message = str(err).replace("deltaT", "delta-t").replace("init_r", "init-r")
        raise ConfigError(f"adalora: {message.replace('target_r', 'target-r')}") from None
