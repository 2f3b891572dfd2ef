"""What an optax user tries first: inject_hyperparams, argument order, reading the route state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from molf_jax.routing import MolfRouteState, label_lora_experts, molf_adamw, molf_route
from tests.test_routing import random_grads, small_model


def one_step(tx, params, seed=0):
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(random_grads(params, seed), state, params)
    return updates, state


def route_state(state) -> MolfRouteState:
    return optax.tree_utils.tree_get(state, "MolfRouteState")


def test_inject_hyperparams_molf_adamw_matches_the_plain_recipe():
    params = small_model()
    labels = label_lora_experts(params)
    plain = molf_adamw(labels, fft_learning_rate=1e-2, lora_learning_rate=3e-2, top_k=2)
    injected = optax.inject_hyperparams(molf_adamw)(labels, fft_learning_rate=1e-2,
                                                    lora_learning_rate=3e-2, top_k=2)
    want_updates, want_state = one_step(plain, params)
    got_updates, got_state = one_step(injected, params)
    # Injected hyperparameters are float32 arrays (b1, b2, eps): updates agree to ~1e-5.
    chex.assert_trees_all_close(got_updates, want_updates, rtol=1e-4)
    np.testing.assert_array_equal(route_state(got_state).winners,
                                  route_state(want_state).winners)
    np.testing.assert_allclose(route_state(got_state).scores, route_state(want_state).scores,
                               rtol=1e-4)
    assert float(got_state.hyperparams["lora_learning_rate"]) == pytest.approx(3e-2)


def test_epd_reads_the_rates_set_in_the_injected_state():
    """EPD is proportional to each expert's rate: raising the LoRA rate in the state raises the
    LoRA experts' scores by the same factor and leaves the FFT expert's alone."""
    params = small_model()
    tx = optax.inject_hyperparams(molf_adamw)(label_lora_experts(params),
                                              fft_learning_rate=1e-2, lora_learning_rate=1e-2)
    grads = random_grads(params, 0)
    state = tx.init(params)
    _, base = tx.update(grads, state, params)
    state.hyperparams["lora_learning_rate"] = jnp.asarray(1e-1)
    _, raised = tx.update(grads, state, params)
    before, after = route_state(base).scores, route_state(raised).scores
    np.testing.assert_allclose(after[:, 0], before[:, 0], rtol=1e-4)
    lora = np.isfinite(before[:, 1:])
    np.testing.assert_allclose(after[:, 1:][lora], 10 * before[:, 1:][lora], rtol=1e-5)


def test_molf_route_reads_the_rate_of_an_injected_inner_optimizer():
    params = small_model()
    schedule = optax.linear_schedule(1e-3, 1e-2, 4)
    explicit = molf_route(optax.adamw(schedule), label_lora_experts, learning_rate=schedule)
    implicit = molf_route(optax.inject_hyperparams(optax.adamw)(schedule), label_lora_experts)
    states = {}
    for name, tx in (("explicit", explicit), ("implicit", implicit)):
        state, p = tx.init(params), params
        for t in range(3):
            updates, state = tx.update(random_grads(p, t), state, p)
            p = optax.apply_updates(p, updates)
        states[name] = (p, state)
    # Float32 injected b1, b2, eps (see above).
    chex.assert_trees_all_close(states["implicit"][0], states["explicit"][0], rtol=1e-4)
    np.testing.assert_allclose(states["implicit"][1].scores, states["explicit"][1].scores,
                               rtol=1e-4)


def test_molf_route_without_a_rate_to_read_says_what_to_give():
    with pytest.raises(ValueError, match="give learning_rate="):
        molf_route(optax.adamw(1e-3), label_lora_experts).init(small_model())


def test_swapped_arguments_say_which_form_to_use():
    message = (r"wrap the optimizer: molf_route\(optax.adamw\(...\), labels, ...\); the chain "
               r"form is molf_gate")
    with pytest.raises(TypeError, match=message):
        molf_route(label_lora_experts, optax.adamw(1e-3), learning_rate=1e-3)
    with pytest.raises(TypeError, match=message):
        molf_route(label_lora_experts, learning_rate=1e-3, labels=None)


def test_route_state_is_found_by_name_inside_a_chain():
    params = small_model()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     molf_adamw(label_lora_experts, fft_learning_rate=1e-2,
                                lora_learning_rate=1e-2))
    _, state = one_step(tx, params)
    found = route_state(state)
    assert isinstance(found, MolfRouteState)
    assert found.winners.shape == (4, 3) and int(found.winners.sum()) == 4
