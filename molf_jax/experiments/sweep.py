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
import pickle
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from molf_jax.data import (PROTOCOL_SETTINGS, BatchIterator, fixed_lengths,
                           loss_token_budget)
from molf_jax.param_roles import expert_labels, split_trainable
from molf_jax.routing import routing_table
from molf_jax.train.config import TrainConfig
from molf_jax.train.loop import total_optimizer_steps
from molf_jax.train.modes import build_optimizer, mode_of
from molf_jax.train.plan import resolve_config
from molf_jax.train.setup import add_mode_adapters, training_model
from molf_jax.train.step import make_train_step
from molf_jax.trees import join_trees

__all__ = ["Member", "MemberProgram", "SweepResult", "train_members", "member_params",
           "member_batches", "member_loss_tokens"]


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


def member_loss_tokens(config: TrainConfig, examples: Sequence[Sequence]) -> int:
    """Target positions the loss gathers per micro-batch: a bound no batch of any member's
    examples exceeds (`molf_jax.data.loss_token_budget`)."""
    return max(loss_token_budget(per, config.batch_size)
               for per in examples)


def _stack_members(batches: list[list[dict]]) -> dict[str, np.ndarray]:
    """[K][micro] batches -> arrays [K, micro, rows, length], padded to the longest."""
    length = max(b["input_ids"].shape[1] for per in batches for b in per)
    out = {}
    for key in ("input_ids", "attention_mask", "loss_mask"):
        out[key] = np.stack([np.stack([np.pad(b[key], ((0, 0), (0, length - b[key].shape[1])))
                                       for b in per]) for per in batches]).astype(np.int32)
    return out


class MemberProgram:
    """The two jitted functions of a sweep (init and step over K stacked members), built from
    abstract shapes so that they can be compiled ahead, e.g. in a thread while another program
    trains (`compile`). `train_members` builds one itself when given none.

    Args:
      config: the runs' shared settings (as `train_members`), numerics resolved.
      model_config: the base model's `DecoderConfig`.
      base_params: the base parameters or their shapes (`jax.ShapeDtypeStruct` leaves).
      num_members: K.
      total_steps: optimizer steps (fixes the schedules).
      batch_shape: ``(micro, rows, length)`` of each member's batch, or None (no `compile`).
      loss_tokens: the output head runs on this many gathered target positions per
        micro-batch (`molf_jax.data.loss_token_budget` of the members' examples); None: on
        every position.
    """

    def __init__(self, config: TrainConfig, model_config: Any, base_params: Any,
                 num_members: int, total_steps: int, batch_shape: tuple[int, int, int] | None,
                 loss_tokens: int | None = None):
        config = resolve_config(config)
        mode = mode_of(config)
        self.config, self.total_steps, self.loss_tokens = config, total_steps, loss_tokens
        self.num_members, self.batch_shape = num_members, batch_shape
        self.spec = mode.lora_spec(config)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_params)
        abstract = jax.eval_shape(
            lambda p, key: add_mode_adapters(config, p, key)[0], shapes, jax.random.key(0))
        self.roles = mode.roles(config, abstract)
        self.routed = mode.routes
        self.model = training_model(config, model_config, self.spec)
        trainable, frozen = split_trainable(abstract, self.roles)
        self._abstract = (trainable, frozen)
        roles, model, routed = self.roles, self.model, self.routed
        regularizer = mode.regularizer(config)

        def optimizer(peak):
            return build_optimizer(config, total_steps, roles, peak_rates=(peak[0], peak[1]))[0]

        def member_step(train_params, opt_state, batch, seed, peak, frozen_params):
            step = make_train_step(model, optimizer(peak), roles=roles, seed=seed,
                                   loss_chunk=config.loss_chunk,
                                   dropout=mode.dropout(config),
                                   route_fft_column=mode.routes and mode.fft_expert,
                                   return_routing=routed, regularizer=regularizer,
                                   loss_tokens=loss_tokens)
            params, opt_state, metrics = step(join_trees(train_params, frozen_params),
                                              opt_state, batch)
            kept = {"loss": jnp.where(metrics["skipped"], jnp.nan, metrics["loss"])}
            if routed:
                kept["winners"] = metrics["route_winners"]
            return split_trainable(params, roles)[0], opt_state, kept

        self.init = jax.jit(jax.vmap(lambda p, peak: optimizer(peak).init(p)))
        self.step = jax.jit(jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, None)),
                            donate_argnums=(0, 1))

    def lower(self):
        """Traces and lowers init and step for the abstract shapes: ``(init, step)`` as
        `jax.stages.Lowered` (the Python half of `compile`, before XLA)."""
        k = self.num_members
        stacked = lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype)  # noqa: E731
        trainable = jax.tree.map(stacked, self._abstract[0])
        peaks = jax.ShapeDtypeStruct((k, 2), jnp.float32)
        opt_state = jax.eval_shape(self.init, trainable, peaks)
        batch = {key: jax.ShapeDtypeStruct((k, *self.batch_shape), jnp.int32)
                 for key in ("input_ids", "attention_mask", "loss_mask")}
        batch["step"] = jax.ShapeDtypeStruct((k,), jnp.int32)
        return (self.init.lower(trainable, peaks),
                self.step.lower(trainable, opt_state, batch,
                                jax.ShapeDtypeStruct((k,), jnp.int32), peaks, self._abstract[1]))

    def compile(self, compiler_options: dict[str, Any] | None = None) -> "MemberProgram":
        """Compiles init and step for the abstract shapes (thread-safe; returns self).

        Args:
          compiler_options: XLA options of the step's compilation (``Lowered.compile``'s),
            e.g. ``{"xla_gpu_enable_triton_gemm": False}``; an unknown name raises.
        """
        init, step = self.lower()
        self.init = init.compile()
        self.step = step.compile(compiler_options=compiler_options or None)
        return self

    def serialize(self) -> bytes:
        """The compiled init and step as bytes that `load` takes in another process on the
        same kind of device and JAX (`jax.experimental.serialize_executable`).

        Compile with JAX's persistent cache off (``jax_enable_compilation_cache``): on the CPU
        an executable the cache gave back serializes without some of its functions, and the
        loaded program fails when run (JAX 0.10 and 0.11)."""
        from jax.experimental.serialize_executable import serialize

        if not isinstance(self.step, jax.stages.Compiled):
            raise ValueError("serialize a MemberProgram after compile()")
        return pickle.dumps((serialize(self.init), serialize(self.step)))

    def load(self, serialized: bytes) -> "MemberProgram":
        """Takes init and step from `serialize`'s bytes instead of compiling them: nothing is
        traced, lowered or compiled here (returns self). Load only bytes you made: unpickling
        runs code."""
        from jax.experimental.serialize_executable import deserialize_and_load

        init, step = pickle.loads(serialized)
        # On the default device, as the jitted functions run (the programs are unsharded).
        device = jax.devices()[:1]
        self.init, self.step = (deserialize_and_load(*init, execution_devices=device),
                                deserialize_and_load(*step, execution_devices=device))
        return self


def train_members(config: TrainConfig, model_config: Any, base_params: Any,
                  examples: Sequence[Sequence], members: Sequence[Member], *, pad_id: int,
                  lengths: Sequence[int] | None = None, on_step=None,
                  program: MemberProgram | None = None) -> SweepResult:
    """Trains ``members`` (seeds and peak rates) of ``config``'s mode as one vmapped program.

    Args:
      config: the runs' shared settings (mode, ranks, alphas, batch, epochs or steps, score,
        top-k, numerics); its own ``seed``, ``fft_lr`` and ``lora_lr`` are not used.
        Settings left None are resolved first (`molf_jax.train.resolve_config`).
      model_config: the base model's `DecoderConfig`.
      base_params: the base model's parameters, without adapters (shared by all members).
      examples: each member's encoded training examples (`molf_jax.data.encode_records`),
        one sequence per member (the offline tasks draw their data from the seed).
      members: the runs; their count K is the vmapped axis.
      pad_id: the tokenizer's padding id.
      lengths: padded batch lengths (default as the trainer: `fixed_lengths` of the cap).
      on_step: called as ``on_step(step, total_steps)`` after each dispatch (progress).
      program: a `MemberProgram` for these settings, K and batch shape, e.g. compiled ahead.

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
    if not members:
        raise ValueError("train_members needs at least one member")
    if len(examples) != len(members):
        raise ValueError(f"{len(members)} members but {len(examples)} training sets")
    config = resolve_config(config)
    iterators, total_steps = member_batches(config, examples, members, pad_id=pad_id,
                                            lengths=lengths)
    budget = member_loss_tokens(config, examples)
    if program is None:
        program = MemberProgram(config, model_config, base_params, len(members), total_steps,
                                None, loss_tokens=budget)
    elif (program.num_members, program.total_steps) != (len(members), total_steps):
        raise ValueError(f"the program was built for {program.num_members} members and "
                         f"{program.total_steps} steps, not {len(members)} and {total_steps}")
    elif program.loss_tokens is not None and program.loss_tokens < budget:
        raise ValueError(f"the program's loss runs on {program.loss_tokens} target positions "
                         f"per batch, but these examples can fill {budget}")
    roles = program.roles
    trainables = []
    for m in members:
        _, lora_key = jax.random.split(jax.random.key(m.seed))
        params, spec = add_mode_adapters(config, base_params, lora_key)
        trainable, frozen = split_trainable(params, roles)
        trainables.append(trainable)
        del params
    trainable = jax.tree.map(lambda *xs: jnp.stack(xs), *trainables)
    del trainables
    seeds = jnp.asarray([m.seed for m in members], jnp.int32)
    peaks = jnp.asarray([[m.fft_lr, m.lora_lr] for m in members], jnp.float32)
    opt_state = program.init(trainable, peaks)
    pending, tokens = [], np.zeros(len(members), np.int64)
    for step in range(total_steps):
        per_member = [[next(it) for _ in range(config.grad_accum)] for it in iterators]
        batch = _stack_members(per_member)
        tokens += batch["attention_mask"].sum(axis=(1, 2, 3))
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch["step"] = jnp.full((len(members),), step, jnp.int32)
        trainable, opt_state, kept = program.step(trainable, opt_state, batch, seeds, peaks,
                                                  frozen)
        pending.append(kept)  # read back once at the end: no host sync inside the loop
        if on_step is not None:
            on_step(step + 1, total_steps)
    host = jax.device_get(pending)
    names: tuple[str, ...] = ()
    winners = None
    if program.routed:
        names = tuple(routing_table(expert_labels(roles),
                                    jax.tree.map(lambda x: x[0], trainable)).module_names)
        winners = np.stack([h["winners"] for h in host])
    return SweepResult(trainable=trainable, frozen=frozen, opt_state=opt_state, spec=spec,
                       losses=np.stack([h["loss"] for h in host]), winners=winners,
                       module_names=names, steps=total_steps, tokens=tokens)
