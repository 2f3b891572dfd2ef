"""optax's shared optimizer tests, restated for the routed optimizers.

The cases of ``optax/contrib/_common_test.py`` and of the wrapper tests in
``optax/transforms/`` (masking, combining, accumulation, conditionality), run against
``molf_adamw`` and ``molf_route(adamw)`` on a tree with routed modules (`small_model`: two
layers of q_proj with FFT + 2 LoRA experts and up_proj with FFT + 1, plus a norm).

What cannot apply, and why:
  * "repeated application without params" (partition/masked tests): routing reads the params
    (the routing table and the `Score` contract take them), so ``update`` without params is
    refused with a clear error (pinned below).
  * complex dtypes: the scores compare real numbers (m^2 / sqrt(v) summed per expert).
  * ``apply_if_finite`` under ``pmap``: pmap is legacy; the sharded form is tested under jit
    with a mesh in test_custom_loops.py.
  * float64: needs the process-wide x64 flag; float16, bfloat16 and float32 are tested.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from molf_jax.routing import (ExpertLabel, MolfRouteState, label_lora_experts, molf_adamw,
                              molf_gate, molf_route)
from tests.test_routing import random_grads, small_model

LR = 1e-2

OPTIMIZERS = {
    "molf_adamw": lambda labels=label_lora_experts, decay=1.0: molf_adamw(
        labels, fft_learning_rate=LR, lora_learning_rate=LR, fft_weight_decay=0.1 * decay,
        lora_weight_decay=0.01 * decay),
    "molf_route(adamw)": lambda labels=label_lora_experts, decay=1.0: molf_route(
        optax.adamw(LR, weight_decay=1e-4 * decay), labels, learning_rate=LR),
}
both = pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())


def targets_of(params, seed=1):
    """Within 0.5 of the params, so that a few hundred Adam steps of 1e-2 reach them."""
    return jax.tree.map(lambda p, g: p + 0.5 * jnp.tanh(g), params, random_grads(params, seed))


def loss_fn(params, targets):
    return sum(jnp.sum(jnp.square(p - t)) for p, t in
               zip(jax.tree.leaves(params), jax.tree.leaves(targets)))


def route_state(state) -> MolfRouteState:
    return optax.tree_utils.tree_get(state, "MolfRouteState")


def frozen_part(params):
    """'frozen' for the norm and the up_proj kernels, 'molf' for the rest."""
    def label(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return "frozen" if name.startswith("norm") or name.endswith("up_proj/kernel") else "molf"
    return jax.tree_util.tree_map_with_path(label, params)


def without_frozen(tree):
    """The tree with the frozen leaves dropped (what a partition's molf part trains)."""
    out = jax.tree.map(lambda x: x, tree)
    del out["norm"]
    for layer in out["layers"].values():
        del layer["up_proj"]["kernel"]
    return out


@both
def test_accepts_extra_args_and_compiles_once(make):
    tx, params = make(), small_model()
    targets = targets_of(params)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.grad(loss_fn)(params, targets)
        updates, state = tx.update(grads, state, params, unexpected_extra_arg=1)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1


@both
def test_converges_on_a_quadratic_and_map_params_is_a_no_op(make):
    # Without weight decay, whose decoupled pull moves AdamW's fixed point off the target.
    tx, params = make(decay=0.0), small_model()
    targets = targets_of(params)
    state = tx.init(params)
    mapped = optax.tree.map_params(tx, lambda v: v, state)
    chex.assert_trees_all_equal(mapped, state)

    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(loss_fn)(params, targets), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=3000))((params, state))
    chex.assert_trees_all_close(params, targets, atol=3e-2)
    # Every expert won some steps on the way (routing, not one fixed expert).
    counts = np.asarray(route_state(state).win_counts)
    assert (counts[np.asarray(route_state(state).scores) > -np.inf] > 0).all()


@pytest.mark.parametrize("label_fn", [label_lora_experts, lambda p: ExpertLabel("all", 0)],
                         ids=["returns None on a count", "returns one label on a count"])
def test_molf_route_factory_under_inject_hyperparams(label_fn):
    """A factory over molf_route: its label function must be static (inject_hyperparams takes
    any callable for a schedule and calls it with the step count); the error says so, and with
    static_args it matches."""
    params = small_model()

    def factory(labels, learning_rate):
        return molf_route(optax.adamw(learning_rate), labels, learning_rate=learning_rate)

    with pytest.raises(ValueError, match="called with the step count.*static_args"):
        optax.inject_hyperparams(factory)(label_fn, LR).init(params)
    injected = optax.inject_hyperparams(factory, static_args="labels")(label_lora_experts, LR)
    plain = factory(label_lora_experts, LR)
    grads = random_grads(params, 0)
    want, want_state = jax.jit(plain.update)(grads, plain.init(params), params)
    got, got_state = jax.jit(injected.update)(grads, injected.init(params), params)
    chex.assert_trees_all_close(got, want, rtol=1e-5)
    np.testing.assert_array_equal(route_state(got_state).winners,
                                  route_state(want_state).winners)


@both
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_updates_keep_the_params_dtype(make, dtype):
    tx, params = make(), small_model(dtype=dtype)
    updates, _ = jax.jit(tx.update)(random_grads(params, 0), jax.jit(tx.init)(params), params)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}


@both
def test_multi_steps_accumulates_then_takes_one_routed_step(make):
    params = small_model()
    tx = optax.MultiSteps(make(), every_k_schedule=4)
    grads = [random_grads(params, t) for t in range(4)]
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads[:3]:
        updates, state = update(g, state, params)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    updates, state = update(grads[3], state, params)
    mean = jax.tree.map(lambda *g: sum(g) / 4, *grads)
    plain = make()
    want, _ = jax.jit(plain.update)(mean, plain.init(params), params)
    chex.assert_trees_all_close(updates, want, rtol=1e-5, atol=1e-7)


@both
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_state_shapes_and_dtypes_stable_under_lax_cond(make, dtype):
    tx, params = make(), small_model(dtype=dtype)
    targets = targets_of(params)

    @jax.jit
    def step(params, state, flip):
        grads = jax.grad(loss_fn)(params, targets)
        # lax.cond demands identical state types in both branches.
        updates, new_state = jax.lax.cond(
            flip, lambda: tx.update(grads, state, params),
            lambda: (jax.tree.map(jnp.zeros_like, params), state))
        return optax.apply_updates(params, updates), new_state

    state = tx.init(params)
    for flip in (True, False, True):
        params, state = step(params, state, flip)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    assert int(route_state(state).count) == 2


@both
def test_apply_if_finite_skips_a_nonfinite_step_whole(make):
    params = small_model()
    tx = optax.apply_if_finite(make(), max_consecutive_errors=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = random_grads(params, 0)
    bad = jax.tree.map(lambda g: g, grads)
    bad["layers"]["0"]["q_proj"]["lora_1"]["a"] = bad["layers"]["0"]["q_proj"]["lora_1"]["a"].at[
        0, 0].set(jnp.inf)
    updates, skipped = update(bad, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
    assert int(skipped.notfinite_count) == 1
    updates, state = update(grads, skipped, params)
    assert int(route_state(state).count) == 1 and int(state.notfinite_count) == 0
    assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


@both
@pytest.mark.parametrize("labels_as", ["function", "tree"])
def test_partition_freezes_bitwise_and_routes_the_rest(make, labels_as):
    """The usual way to freeze part of a model: the frozen leaves never move, and the routed
    part steps exactly as the routed optimizer on that part alone."""
    assert optax.multi_transform is optax.partition  # the older name, the same function
    params = small_model()
    labels = label_lora_experts if labels_as == "function" else label_lora_experts(params)
    part_labels = frozen_part if labels_as == "function" else frozen_part(params)
    tx = optax.partition({"molf": make(labels), "frozen": optax.set_to_zero()}, part_labels)
    alone = make(label_lora_experts)
    state, alone_state = tx.init(params), alone.init(without_frozen(params))
    p, q = params, without_frozen(params)
    for t in range(3):
        grads = random_grads(p, t)
        updates, state = jax.jit(tx.update)(grads, state, p)
        want, alone_state = jax.jit(alone.update)(without_frozen(grads), alone_state, q)
        p, q = optax.apply_updates(p, updates), optax.apply_updates(q, want)
        chex.assert_trees_all_close(without_frozen(updates), want, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(p["norm"]["scale"], params["norm"]["scale"])
    for layer in ("0", "1"):
        np.testing.assert_array_equal(p["layers"][layer]["up_proj"]["kernel"],
                                      params["layers"][layer]["up_proj"]["kernel"])
    # up_proj's FFT expert is frozen: its modules route among LoRA experts only.
    winners = np.asarray(route_state(state).winners)
    np.testing.assert_array_equal(winners, np.asarray(route_state(alone_state).winners))
    assert not winners[[1, 3], 0].any()


@both
@pytest.mark.parametrize("labels_as", ["function", "tree"])
def test_masked_routes_the_masked_in_part_and_passes_the_rest(make, labels_as):
    """optax.masked passes masked-out updates through unchanged (optax's semantics); the
    masked-in part steps as the routed optimizer on that part alone; a set_to_zero on the
    complement freezes it."""
    params = small_model()
    labels = label_lora_experts if labels_as == "function" else label_lora_experts(params)
    trainable = lambda p: jax.tree.map(lambda label: label == "molf", frozen_part(p))
    frozen = lambda p: jax.tree.map(lambda label: label == "frozen", frozen_part(p))
    grads = random_grads(params, 0)
    masked = optax.masked(make(labels), trainable if labels_as == "function"
                          else trainable(params))
    updates, _ = jax.jit(masked.update)(grads, masked.init(params), params)
    np.testing.assert_array_equal(updates["norm"]["scale"], grads["norm"]["scale"])
    alone = make(label_lora_experts)
    want, _ = alone.update(without_frozen(grads), alone.init(without_frozen(params)),
                           without_frozen(params))
    chex.assert_trees_all_close(without_frozen(updates), want, rtol=1e-6, atol=1e-9)

    tx = optax.chain(masked, optax.masked(optax.set_to_zero(), frozen))
    state, p = tx.init(params), params
    for t in range(2):
        updates, state = jax.jit(tx.update)(random_grads(p, t), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(p["norm"]["scale"], params["norm"]["scale"])


@both
def test_map_params_reaches_the_moments_inside_a_partition(make):
    params = small_model()
    tx = optax.partition({"molf": make(), "frozen": optax.set_to_zero()}, frozen_part)
    state = tx.init(params)
    names = jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params)
    is_masked = lambda v: isinstance(v, optax.MaskedNode)
    mapped = optax.tree.map_params(tx, lambda v, name: v if is_masked(v) else name, state,
                                   names, transform_non_params=lambda _: "other",
                                   is_leaf=is_masked)
    moments = optax.tree_utils.tree_get_all_with_path(
        mapped, "mu", filtering=lambda _, v: isinstance(v, dict))
    assert len(moments) in (1, 3)  # molf_route's AdamW, or molf_adamw's fft/no-decay/lora
    seen = set()
    for _, mu in moments:
        for path, leaf in jax.tree_util.tree_flatten_with_path(mu, is_leaf=is_masked)[0]:
            if not is_masked(leaf):
                assert leaf == jax.tree_util.keystr(path, simple=True, separator="/")
                seen.add(leaf)
    assert seen == set(jax.tree.leaves(without_frozen(names)))
    assert route_state(mapped).winners == "other"


@both
def test_update_without_params_is_refused_clearly(make):
    tx, params = make(), small_model()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(random_grads(params, 0), tx.init(params))


def test_molf_gate_inside_a_partition_and_map_params():
    """The approximate gate form (before a stock AdamW) freezes and maps the same way."""
    params = small_model()
    gated = optax.chain(molf_gate(label_lora_experts), optax.adamw(LR))
    tx = optax.partition({"molf": gated, "frozen": optax.set_to_zero()}, frozen_part)
    state, p = tx.init(params), params
    for t in range(2):
        updates, state = jax.jit(tx.update)(random_grads(p, t), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_array_equal(p["norm"]["scale"], params["norm"]["scale"])
    gate = optax.tree_utils.tree_get(state, "MolfGateState")
    assert gate.winners.shape == (4, 3) and not np.asarray(gate.winners)[[1, 3], 0].any()
    chex.assert_trees_all_equal_structs(optax.tree.map_params(tx, lambda v: v, state), state)
