"""Several runs of one mode trained as one program: ``jax.vmap`` over seeds and peak rates.

A sweep over seeds and learning rates of one mode repeats the same computation on small
models: at the Gemma 3 270M's size a single run leaves the GPU mostly idle (its step is
launch-bound). `train_members` stacks the members' trainable parameters and optimizer states
along a leading axis and runs their steps as one vmapped, jitted program, compiled once per
(mode, batch shape): the peak rates and the seed are traced values, so a new rate or seed does
not compile again. Frozen leaves (the base of lora, molfe and adalora runs) are stored once and
shared by every member.

Each member is exactly the run ``molf-jax train`` makes with that seed and those rates: the
same adapter initialisation (``split(key(seed))[1]``), the same data order
(`molf_jax.data.BatchIterator` seeded by the member's seed), the same dropout keys and the same
optimizer (`molf_jax.train.build_optimizer`); tests pin both equalities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from molf_jax.data import PROTOCOL_SETTINGS, BatchIterator, fixed_lengths
from molf_jax.param_roles import expert_labels, split_trainable
from molf_jax.routing import routing_table
from molf_jax.train.config import FFT_EXPERT_MODES, ROUTED_MODES, TrainConfig
from molf_jax.train.loop import total_optimizer_steps
from molf_jax.train.modes import build_optimizer, loss_regularizer, mode_roles
from molf_jax.train.setup import add_mode_adapters, training_model
from molf_jax.train.step import make_train_step
from molf_jax.train.trees import join_trees

__all__ = ["Member", "SweepResult", "train_members", "member_params", "member_batches"]


@dataclasses.dataclass(frozen=True)
class Member:
    """One run of a sweep: its seed and its two peak learning rates.

    Attributes:
      seed: seed of the adapters' initialisation, the data order and the dropout.
      fft_lr: peak rate of the FFT expert and the non-routed leaves.
      lora_lr: peak rate of the LoRA experts.
    """

    seed: int
    fft_lr: float
    lora_lr: float


class SweepResult(NamedTuple):
    """What `train_members` returns.

    Attributes:
      trainable: the members' trainable leaves, stacked on a leading axis of size K.
      frozen: the leaves no member trains (shared; not stacked).
      opt_state: the members' optimizer states, stacked.
      spec: the mode's `LoraSpec` / `AdaLoraSpec` (None for fft).
      losses: [steps, K] training loss of every step (NaN where a step was skipped).
      winners: [steps, K, modules, experts] routing winners (routed modes), else None.
      module_names: the routed modules, in the order of ``winners``' third axis.
      steps: optimizer steps taken.
      tokens: target-and-prompt tokens seen per member (the same count for all).
    """

    trainable: Any
    frozen: Any
    opt_state: Any
    spec: Any
    losses: np.ndarray
    winners: np.ndarray | None
    module_names: tuple[str, ...]
    steps: int
    tokens: np.ndarray


def member_params(result: SweepResult, index: int) -> Any:
    """Member ``index``'s full parameter tree (trainable joined with the shared frozen part).

    Example:
      >>> params = member_params(result, 0)              # doctest: +SKIP
    """
    return join_trees(jax.tree.map(lambda x: x[index], result.trainable), result.frozen)


def member_batches(config: TrainConfig, examples: Sequence[Sequence], members: Sequence[Member],
                   *, pad_id: int, lengths: Sequence[int] | None = None):
    """The members' batch iterators (each over its own examples, seeded by its member as the
    trainer seeds its own) and the optimizer steps of the run, which all members share."""
    cap = config.length_cap
    longest = max(len(e) for per in examples for e in per)
    lengths = tuple(lengths or fixed_lengths(cap or longest))
    protocol = config.data_protocol
    iterators = [BatchIterator(per, batch_size=config.batch_size, pad_id=pad_id,
                               seed=m.seed, max_length=cap, lengths=lengths,
                               bucket_batches=PROTOCOL_SETTINGS[protocol].bucket_batches)
                 for per, m in zip(examples, members)]
    steps = {total_optimizer_steps(config, it.steps_per_epoch) for it in iterators}
    if len(steps) != 1:
        raise ValueError(f"the members' training sets give different step counts {sorted(steps)}"
                         "; a vmapped sweep needs one (give them equally many examples)")
    return iterators, steps.pop()


def _stack_members(batches: list[list[dict]]) -> dict[str, np.ndarray]:
    """[K][micro] batches -> arrays [K, micro, rows, length], padded to the longest."""
    length = max(b["input_ids"].shape[1] for per in batches for b in per)
    out = {}
    for key in ("input_ids", "attention_mask", "loss_mask"):
        out[key] = np.stack([np.stack([np.pad(b[key], ((0, 0), (0, length - b[key].shape[1])))
                                       for b in per]) for per in batches]).astype(np.int32)
    return out


def train_members(config: TrainConfig, model_config: Any, base_params: Any,
                  examples: Sequence[Sequence], members: Sequence[Member], *, pad_id: int,
                  lengths: Sequence[int] | None = None, on_step=None) -> SweepResult:
    """Trains ``members`` (seeds and peak rates) of ``config``'s mode as one vmapped program.

    Args:
      config: the runs' shared settings (mode, ranks, alphas, batch, epochs or steps, score,
        top-k, numerics); its own ``seed``, ``fft_lr`` and ``lora_lr`` are not used.
        Numerics left None take the platform's (`with_platform_defaults`).
      model_config: the base model's `DecoderConfig`.
      base_params: the base model's parameters, without adapters (shared by all members).
      examples: each member's encoded training examples (`molf_jax.data.encode_records`),
        one sequence per member (the offline tasks draw their data from the seed).
      members: the runs; their count K is the vmapped axis.
      pad_id: the tokenizer's padding id.
      lengths: padded batch lengths (default as the trainer: `fixed_lengths` of the cap).
      on_step: called as ``on_step(step, total_steps)`` after each dispatch (progress).

    Returns:
      A `SweepResult`; `member_params` gives each member's parameters.

    Example:
      >>> result = train_members(TrainConfig(mode="lora", steps=10), source.config, params,
      ...                        [examples0, examples1],
      ...                        [Member(0, 5e-5, 5e-4), Member(1, 5e-5, 5e-4)],
      ...                        pad_id=0)                                  # doctest: +SKIP
      >>> result.losses.shape                                             # doctest: +SKIP
      (10, 2)
    """
    from molf_jax.train.platform import with_platform_defaults

    if not members:
        raise ValueError("train_members needs at least one member")
    if len(examples) != len(members):
        raise ValueError(f"{len(members)} members but {len(examples)} training sets")
    config = with_platform_defaults(config)
    trees, spec = [], None
    for m in members:
        _, lora_key = jax.random.split(jax.random.key(m.seed))
        params, spec = add_mode_adapters(config, base_params, lora_key)
        trees.append(params)
    roles = mode_roles(config, trees[0])
    splits = [split_trainable(t, roles) for t in trees]
    frozen = splits[0][1]
    trainable = jax.tree.map(lambda *xs: jnp.stack(xs), *[s[0] for s in splits])
    del trees, splits
    model = training_model(config, model_config, spec)
    iterators, total_steps = member_batches(config, examples, members, pad_id=pad_id,
                                            lengths=lengths)
    seeds = jnp.asarray([m.seed for m in members], jnp.int32)
    peaks = jnp.asarray([[m.fft_lr, m.lora_lr] for m in members], jnp.float32)
    regularizer = loss_regularizer(config)
    routed = config.mode in ROUTED_MODES

    def member_step(train_params, opt_state, batch, seed, peak, frozen_params):
        optimizer, _ = build_optimizer(config, total_steps, roles,
                                       peak_rates=(peak[0], peak[1]))
        step = make_train_step(model, optimizer, roles=roles, seed=seed,
                               loss_chunk=config.loss_chunk,
                               dropout=config.mode != "fft" and config.lora_dropout > 0,
                               route_fft_column=config.mode in FFT_EXPERT_MODES,
                               return_routing=routed, regularizer=regularizer)
        params, opt_state, metrics = step(join_trees(train_params, frozen_params), opt_state,
                                          batch)
        kept = {"loss": jnp.where(metrics["skipped"], jnp.nan, metrics["loss"])}
        if routed:
            kept["winners"] = metrics["route_winners"]
        return split_trainable(params, roles)[0], opt_state, kept

    def init_one(train_params, peak):
        optimizer, _ = build_optimizer(config, total_steps, roles,
                                       peak_rates=(peak[0], peak[1]))
        return optimizer.init(train_params)

    opt_state = jax.jit(jax.vmap(init_one))(trainable, peaks)
    step_all = jax.jit(jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, None)),
                       donate_argnums=(0, 1))
    pending, tokens = [], np.zeros(len(members), np.int64)
    for step in range(total_steps):
        per_member = [[next(it) for _ in range(config.grad_accum)] for it in iterators]
        batch = _stack_members(per_member)
        tokens += batch["attention_mask"].sum(axis=(1, 2, 3))
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch["step"] = jnp.full((len(members),), step, jnp.int32)
        trainable, opt_state, kept = step_all(trainable, opt_state, batch, seeds, peaks, frozen)
        pending.append(kept)  # read back once at the end: no host sync inside the loop
        if on_step is not None:
            on_step(step + 1, total_steps)
    host = jax.device_get(pending)
    names: tuple[str, ...] = ()
    winners = None
    if routed:
        names = tuple(routing_table(expert_labels(roles),
                                    jax.tree.map(lambda x: x[0], trainable)).module_names)
        winners = np.stack([h["winners"] for h in host])
    return SweepResult(trainable=trainable, frozen=frozen, opt_state=opt_state, spec=spec,
                       losses=np.stack([h["loss"] for h in host]), winners=winners,
                       module_names=names, steps=total_steps, tokens=tokens)
