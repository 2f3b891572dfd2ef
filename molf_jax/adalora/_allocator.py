"""AdaLoRA's rank allocator as an optax wrapper around the inner optimizer (AdamW).

Step for step what peft's ``RankAllocator`` does when ``update_and_allocate(t)`` is called after
``optimizer.step()`` and before ``zero_grad()`` (peft's documented order), with ``t`` the
0-based index of the step just taken:

1. the inner optimizer updates every leaf (masked singular values included: peft leaves them in
   the optimizer, so they may grow back between allocations);
2. while ``t < total_step - tfinal``: the sensitivity ``I = |p * g|`` of every factor entry
   (``p`` after this step's update, ``g`` this step's gradient) is smoothed,
   ``I_bar <- beta1 I_bar + (1 - beta1) I``, and its uncertainty
   ``U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|`` (paper Eqs. 8-9);
3. each triplet's score is ``S_e + mean_in(S_a) + mean_out(S_b)`` with ``S = I_bar * U_bar``
   elementwise (paper Eqs. 10-11);
4. at an allocation step the singular values whose score is at or below the
   ``(init_budget - budget)``-th smallest score of all modules are set to zero; the budget
   follows peft's cubic schedule from ``init_r`` to ``target_r`` per module (no pruning up to
   ``tinit``, every ``deltaT`` steps until ``total_step - tfinal``, where the final pattern is
   fixed and the statistics dropped; after it the final pattern is applied every step).

Everything is array work under jit: the schedule is a small table indexed by the step count,
and the threshold comes from a sort on the device. The state (statistics, the current pattern)
is part of the optimizer state, so checkpoints and ``--resume`` carry it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from molf_jax.adalora._adapters import ADALORA_KEY

__all__ = ["AdaLoraAllocatorState", "AdaLoraSchedule", "adalora_allocate", "apply_rank_pattern",
           "find_allocator_state", "rank_counts", "rank_module_names", "rank_pattern"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraSchedule:
    """The allocator's settings, with peft's ``AdaLoraConfig`` names and defaults.

    Attributes:
      total_step: optimizer steps of the run (peft requires it).
      target_r: average rank per module at the end (default 8).
      init_r: rank of every triplet at the start (default 12); the budget starts at
        ``init_r * modules`` and ends at ``target_r * modules``.
      tinit: steps without pruning at the start (default 0).
      tfinal: steps at the end that keep the final pattern fixed (default 0).
      deltaT: steps between allocations while the budget shrinks (default 1).
      beta1: smoothing of the sensitivity (default 0.85).
      beta2: smoothing of its uncertainty (default 0.85).

    Raises:
      ValueError: ``target_r > init_r``, ``deltaT < 1``, a beta outside [0, 1), or a schedule
        with no budgeting phase (``tinit >= total_step - tfinal``, peft's check).

    Example:
      >>> AdaLoraSchedule(total_step=100, tinit=10, tfinal=20).budget(50, modules=2)
      (16, True)
    """

    total_step: int
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ValueError(message)

        need(self.init_r >= 1, f"init_r must be >= 1, got {self.init_r}")
        need(0 <= self.target_r <= self.init_r,
             f"target_r must be between 0 and init_r ({self.init_r}), got {self.target_r}")
        need(self.deltaT >= 1, f"deltaT must be >= 1, got {self.deltaT}")
        for name in ("beta1", "beta2"):
            need(0.0 <= getattr(self, name) < 1.0,
                 f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.tinit >= 0 and self.tfinal >= 0,
             f"tinit and tfinal must be >= 0, got {self.tinit} and {self.tfinal}")
        need(self.total_step >= 1, f"total_step must be >= 1, got {self.total_step}")
        need(self.tinit < self.total_step - self.tfinal,
             f"the AdaLoRA schedule leaves no budgeting phase: tinit ({self.tinit}) must be "
             f"below total_step - tfinal ({self.total_step} - {self.tfinal}); lower tinit or "
             "tfinal, or train more steps")

    @property
    def final_step(self) -> int:
        """The step that fixes the final pattern (``total_step - tfinal``)."""
        return self.total_step - self.tfinal

    def budget(self, step: int, modules: int) -> tuple[int, bool]:
        """peft's ``budget_schedule``: (budget, whether step ``step`` allocates), in Python.

        The cubic is evaluated in float64 and truncated, exactly as peft does.
        """
        init, target = self.init_r * modules, self.target_r * modules
        if step <= self.tinit:
            return init, False
        if step > self.final_step:
            return target, True
        coeff = 1 - (step - self.tinit) / (self.final_step - self.tinit)
        return int((init - target) * (coeff ** 3) + target), step % self.deltaT == 0

    def table(self, modules: int) -> dict[str, np.ndarray]:
        """Per step ``0 .. total_step + 1`` (the last row stands for every later step):
        ``update`` (statistics move), ``allocate`` (a new pattern), ``apply`` (the pattern
        zeroes singular values), ``budget`` and ``reset`` (statistics dropped)."""
        rows = range(self.total_step + 2)
        budget, allocate = zip(*(self.budget(t, modules) for t in rows))
        steps = np.arange(self.total_step + 2)
        allocate = np.array(allocate) & (steps <= self.final_step)  # later: only re-applied
        allocate |= steps == self.final_step
        return {
            "update": steps < self.final_step,
            "allocate": allocate,
            "apply": allocate | (steps > self.final_step),
            "budget": np.array(budget, np.int32),
            "reset": steps == self.final_step,
        }


class AdaLoraAllocatorState(NamedTuple):
    """State of `adalora_allocate`.

    Attributes:
      inner_state: the wrapped optimizer's state.
      count: optimizer steps taken (int32).
      ipt_avg: smoothed sensitivity ``I_bar`` of every factor entry (float32, the triplets'
        layout: a sub-tree of the params holding only the ``adalora`` nodes).
      unc_avg: smoothed uncertainty ``U_bar`` (same layout).
      keep: per triplet, bool [.., init_r]: the singular values the last allocation kept
        (all True before the first one). Same nesting, ``{..., "adalora": keep}``.
      budget: int32, the total rank budget of the last allocation.
    """

    inner_state: optax.OptState
    count: jax.Array
    ipt_avg: Any
    unc_avg: Any
    keep: Any
    budget: jax.Array


def _triplet_tree(tree: Mapping) -> dict:
    """The sub-tree of ``tree`` that holds only the ``adalora`` nodes (same nesting)."""
    out = {}
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            continue
        if key == ADALORA_KEY:
            out[key] = dict(value)
        else:
            sub = _triplet_tree(value)
            if sub:
                out[key] = sub
    return out


def _is_triplet(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {"a", "e", "b"}


def _map_triplets(fn, *trees):
    return jax.tree.map(fn, *trees, is_leaf=_is_triplet)


def _overlay_e(tree: Mapping, es: Mapping) -> dict:
    """``tree`` with each triplet's ``e`` replaced by the one in ``es`` (same nesting)."""
    out = dict(tree)
    for key, value in es.items():
        if key == ADALORA_KEY:
            out[key] = {**tree[key], "e": value}
        else:
            out[key] = _overlay_e(tree[key], value)
    return out


def _triplet_scores(ipt_avg: Mapping, unc_avg: Mapping) -> Any:
    """Per triplet [.., r]: ``S_e + mean_in(S_a) + mean_out(S_b)``, ``S = I_bar * U_bar``."""
    def score(ipt, unc):
        s = {k: ipt[k] * unc[k] for k in ("a", "e", "b")}
        # peft sums the a and b terms first (torch.cat(...).sum(dim=1)), then adds e.
        return s["e"] + (jnp.mean(s["a"], axis=-2) + jnp.mean(s["b"], axis=-1))

    return _map_triplets(score, ipt_avg, unc_avg)


def adalora_allocate(inner: optax.GradientTransformation, schedule: AdaLoraSchedule
                     ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` (e.g. ``optax.adamw``) with AdaLoRA's rank allocation.

    The wrapper forwards everything to ``inner``, then, per the schedule, updates the
    importance statistics and zeroes the pruned singular values: the ``e`` updates it returns
    make ``params + updates`` exactly 0 there. Leaves outside ``adalora`` nodes pass through
    untouched. ``update`` needs ``params``.

    Args:
      inner: the optimizer of every trainable leaf.
      schedule: the allocator's settings (``init_r`` must be the triplets' rank).

    Returns:
      A transform whose state is `AdaLoraAllocatorState`.

    Example:
      >>> tx = adalora_allocate(optax.adamw(1e-3), AdaLoraSchedule(total_step=100))
      >>> state = tx.init(params)                                        # doctest: +SKIP
      >>> updates, state = tx.update(grads, state, params)               # doctest: +SKIP
    """
    def init_fn(params):
        triplets = _triplet_tree(params)
        if not triplets:
            raise ValueError("adalora_allocate: params hold no adalora/{a,e,b} triplets")

        def check(t):
            if t["e"].shape[-1] != schedule.init_r:
                raise ValueError(f"AdaLoRA triplet of rank {t['e'].shape[-1]} but the schedule's "
                                 f"init_r is {schedule.init_r}")
            return t

        _map_triplets(check, triplets)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), triplets)
        keep = _map_triplets(lambda t: jnp.ones(t["e"].shape, bool), triplets)
        return AdaLoraAllocatorState(
            inner_state=inner.init(params), count=jnp.zeros((), jnp.int32), ipt_avg=zeros,
            unc_avg=zeros, keep=keep,
            budget=jnp.asarray(_budget_units(triplets) * schedule.init_r, jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("adalora_allocate needs params in update()")
        grads = updates
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        triplets = _triplet_tree(params)
        modules = _budget_units(triplets)
        table = {k: jnp.asarray(v) for k, v in schedule.table(modules).items()}
        row = jnp.minimum(state.count, schedule.total_step + 1)
        at = {k: v[row] for k, v in table.items()}

        new_params = _triplet_tree(optax.apply_updates(params, updates))
        ipt = jax.tree.map(lambda p, g: jnp.abs(p.astype(jnp.float32) * g.astype(jnp.float32)),
                           new_params, _triplet_tree(grads))
        b1, b2 = schedule.beta1, schedule.beta2
        ipt_avg = jax.tree.map(lambda avg, i: b1 * avg + (1 - b1) * i, state.ipt_avg, ipt)
        unc_avg = jax.tree.map(lambda unc, i, avg: b2 * unc + (1 - b2) * jnp.abs(i - avg),
                               state.unc_avg, ipt, ipt_avg)
        ipt_avg = jax.tree.map(lambda n, o: jnp.where(at["update"], n, o), ipt_avg,
                               state.ipt_avg)
        unc_avg = jax.tree.map(lambda n, o: jnp.where(at["update"], n, o), unc_avg,
                               state.unc_avg)

        scores = _triplet_scores(ipt_avg, unc_avg)
        everything = jnp.concatenate([s.reshape(-1) for s in jax.tree.leaves(scores)])
        pruned = modules * schedule.init_r - at["budget"]
        # peft: torch.kthvalue(scores, k=pruned) and prune every score <= it (ties included).
        threshold = jnp.where(pruned > 0, jnp.sort(everything)[jnp.maximum(pruned - 1, 0)],
                              -jnp.inf)
        keep = jax.tree.map(lambda s, old: jnp.where(at["allocate"], s > threshold, old),
                            scores, state.keep)

        def masked_e(p, u, kept):
            zero_out = at["apply"] & ~kept
            return jnp.where(zero_out, -p["e"], u["e"])  # p + (-p) is exactly 0

        es = _map_triplets(masked_e, triplets, _triplet_tree(updates), keep)
        updates = _overlay_e(updates, es)

        zeros = lambda tree: jax.tree.map(lambda x: jnp.where(at["reset"], 0.0, x), tree)  # noqa: E731
        return updates, AdaLoraAllocatorState(
            inner_state=inner_state, count=state.count + 1, ipt_avg=zeros(ipt_avg),
            unc_avg=zeros(unc_avg), keep=keep,
            budget=jnp.where(at["allocate"], at["budget"], state.budget))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _budget_units(triplets: Mapping) -> int:
    """Modules counted by the budget: every triplet, every layer slice of a scanned one."""
    return sum(int(np.prod(t["e"].shape[:-1])) for t in
               jax.tree.leaves(triplets, is_leaf=_is_triplet))


def find_allocator_state(opt_state: Any) -> AdaLoraAllocatorState | None:
    """The `AdaLoraAllocatorState` inside an optimizer state (a chain, say), or None."""
    is_state = lambda x: isinstance(x, AdaLoraAllocatorState)  # noqa: E731
    for node in jax.tree.leaves(opt_state, is_leaf=is_state):
        if is_state(node):
            return node
    return None


def rank_pattern(opt_state: Any) -> dict[str, np.ndarray]:
    """``{module path: bool [.., init_r]}``: which singular values the last allocation kept.

    Example:
      >>> {p: k.sum(-1) for p, k in rank_pattern(opt_state).items()}   # doctest: +SKIP
      {'layers/mlp/down_proj': array([7, 9, 8]), ...}
    """
    state = find_allocator_state(opt_state)
    if state is None:
        raise ValueError("the optimizer state holds no AdaLoRA allocator state")
    return {path: np.asarray(jax.device_get(keep)) for path, keep in _paths(state.keep)}


def _paths(tree: Mapping, path: tuple[str, ...] = ()):
    for key, value in tree.items():
        if key == ADALORA_KEY:
            yield "/".join(path), value
        else:
            yield from _paths(value, (*path, str(key)))


def apply_rank_pattern(params: Mapping, opt_state: Any) -> dict:
    """``params`` with every pruned singular value set to 0 (``e * keep``), e.g. before an
    export: between allocations peft's optimizer may regrow pruned values, and peft's saved
    adapter drops them by the pattern."""
    keep = dict(rank_pattern(opt_state))

    def visit(tree: Mapping, path: tuple[str, ...]) -> dict:
        out = {}
        for key, value in tree.items():
            if key == ADALORA_KEY:
                kept = jnp.asarray(keep["/".join(path)])
                out[key] = {**value, "e": jnp.where(kept, value["e"], 0).astype(value["e"].dtype)}
            elif isinstance(value, Mapping):
                out[key] = visit(value, (*path, str(key)))
            else:
                out[key] = value
        return out

    return visit(params, ())


def rank_counts(state: AdaLoraAllocatorState) -> jax.Array:
    """int32 [modules]: each module's kept rank (on device, jit-safe), in the order of
    `rank_module_names`."""
    return jnp.concatenate([jnp.sum(k, axis=-1, dtype=jnp.int32).reshape(-1)
                            for k in jax.tree.leaves(state.keep)])


def rank_module_names(state: AdaLoraAllocatorState) -> list[str]:
    """The module of each entry of `rank_counts`: ``layers/3/self_attn/q_proj`` (a scanned
    leaf's layer index goes in after ``layers``).

    Example:
      >>> rank_module_names(find_allocator_state(opt_state))[:1]     # doctest: +SKIP
      ['layers/0/mlp/down_proj']
    """
    names = []
    for path, keep in jax.tree_util.tree_flatten_with_path(state.keep)[0]:
        parts = [str(getattr(k, "key", k)) for k in path][:-1]  # drop the "adalora" level
        if keep.ndim == 1:
            names.append("/".join(parts))
            continue
        for layer in range(int(np.prod(keep.shape[:-1]))):
            names.append("/".join([parts[0], str(layer), *parts[1:]]))
    return names
