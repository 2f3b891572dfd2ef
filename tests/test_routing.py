"""Behaviours of the routing transforms beyond the reference trajectories."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from molf_jax.routing import (
    ExpertLabel,
    Score,
    label_lora_experts,
    molf_adamw,
    molf_gate,
    molf_route,
    routing_table,
)


def lora_module(rng, d_in, d_out, ranks, base=True, bias=True, layers=None, dtype=jnp.float32):
    lead = () if layers is None else (layers,)
    node = {}
    if base:
        node["kernel"] = rng.normal(size=lead + (d_in, d_out))
        if bias:
            node["bias"] = rng.normal(size=lead + (d_out,))
    for i, r in enumerate(ranks, start=1):
        node[f"lora_{i}"] = {"a": rng.normal(size=lead + (d_in, r)),
                             "b": rng.normal(size=lead + (r, d_out)) * 0.1}
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), node)


def small_model(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {
        "layers": {
            "0": {"q_proj": lora_module(rng, 8, 8, [2, 4], dtype=dtype),
                  "up_proj": lora_module(rng, 8, 16, [2], bias=False, dtype=dtype)},
            "1": {"q_proj": lora_module(rng, 8, 8, [2, 4], dtype=dtype),
                  "up_proj": lora_module(rng, 8, 16, [2], bias=False, dtype=dtype)},
        },
        "norm": {"scale": jnp.ones((8,), dtype)},
    }


def random_grads(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    scales = np.exp(np.random.default_rng(seed).normal(size=len(leaves)) * 1.5)
    return jax.tree.unflatten(treedef, [
        (jax.random.normal(k, x.shape) * s).astype(x.dtype)
        for k, x, s in zip(keys, leaves, scales)])


def run_steps(tx, params, steps, jit=True):
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    step = jax.jit(step) if jit else step
    history = []
    for t in range(steps):
        params, state, updates = step(params, state, random_grads(params, t))
        history.append((updates, state))
    return params, state, history


def test_labels_from_paths_of_lora_tree():
    labels = label_lora_experts(small_model())
    q = labels["layers"]["0"]["q_proj"]
    assert q["kernel"] == ExpertLabel("layers/0/q_proj", 0)
    assert q["bias"] == ExpertLabel("layers/0/q_proj", 0)
    assert q["lora_2"]["b"] == ExpertLabel("layers/0/q_proj", 2)
    assert labels["norm"]["scale"] is None
    table = routing_table(label_lora_experts, small_model())
    assert table.module_names == ("layers/0/q_proj", "layers/0/up_proj", "layers/1/q_proj",
                                  "layers/1/up_proj")
    np.testing.assert_array_equal(table.expert_counts(), [3, 2, 3, 2])
    # Expert 0 of q_proj: kernel 8x8 + bias 8; LoRA rank 4: 8x4 + 4x8.
    assert table.num_params[0, 0] == 72 and table.num_params[0, 2] == 64


def test_losers_get_exactly_zero_update_and_all_moments_move():
    params = small_model()
    tx = molf_adamw(label_lora_experts, fft_learning_rate=1e-2, lora_learning_rate=1e-2,
                    fft_weight_decay=0.1, lora_weight_decay=0.1)
    table = routing_table(label_lora_experts, params)
    _, state, history = run_steps(tx, params, 4)
    for updates, st in history:
        winners = np.asarray(st.winners)
        for leaf in table.leaves:
            u = np.asarray(jax.tree.leaves(updates)[leaf.leaf_index])
            if winners[leaf.first_row, leaf.expert]:
                assert np.abs(u).max() > 0
            else:
                assert np.all(u == 0), leaf.path
    np.testing.assert_array_equal(np.asarray(state.win_counts).sum(axis=1), [4, 4, 4, 4])
    # Moments of every leaf, losers included, are Adam's moments of their true gradients (fed
    # zero gradients, a loser's moments would only decay).
    assert not np.asarray(jax.tree.leaves([st.winners for _, st in history])).all()
    mu, nu = _adam_moments_by_path(state)
    assert sorted(mu) == sorted(_paths(params))
    grads = [random_grads(params, t) for t in range(4)]
    for path, leaf in _paths(params).items():
        m, v = np.zeros(leaf.shape), np.zeros(leaf.shape)
        for g in grads:
            g = np.asarray(_paths(g)[path], np.float64)
            m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        np.testing.assert_allclose(mu[path], m, rtol=1e-5, atol=1e-7, err_msg=path)
        np.testing.assert_allclose(nu[path], v, rtol=1e-5, atol=1e-9, err_msg=path)


def _paths(tree) -> dict:
    return {jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _adam_moments_by_path(state) -> tuple[dict, dict]:
    """``(mu, nu)`` by leaf path, gathered from every ScaleByAdamState inside ``state`` (the
    partition's groups hold MaskedNode where a leaf belongs to another group)."""
    found = {}
    for name in ("mu", "nu"):
        found[name] = {}
        for _, tree in optax.tree_utils.tree_get_all_with_path(state, name):
            leaves = jax.tree_util.tree_leaves_with_path(
                tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
            for path, leaf in leaves:
                if not isinstance(leaf, optax.MaskedNode):
                    found[name][jax.tree_util.keystr(path)] = np.asarray(leaf)
    return found["mu"], found["nu"]


def test_top_k_equal_to_expert_count_is_plain_adamw():
    rng = np.random.default_rng(3)
    params = {"a": lora_module(rng, 6, 4, [2, 3]), "b": lora_module(rng, 4, 4, [1, 2])}
    routed = molf_route(optax.adamw(1e-2, weight_decay=0.1), label_lora_experts,
                        learning_rate=1e-2, top_k=3)
    plain = optax.adamw(1e-2, weight_decay=0.1)
    got, _, _ = run_steps(routed, params, 5)
    want, _, _ = run_steps(plain, params, 5)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 got, want)


def test_update_compiles_once_across_steps():
    params = small_model()
    tx = molf_adamw(label_lora_experts, fft_learning_rate=optax.linear_schedule(0, 1e-2, 3),
                    lora_learning_rate=1e-2)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(5):
        params, state = step(params, state, random_grads(params, t))
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_bf16_params_and_states():
    params = small_model(dtype=jnp.bfloat16)
    tx = molf_adamw(label_lora_experts, fft_learning_rate=1e-2, lora_learning_rate=1e-2,
                    mu_dtype=jnp.bfloat16)
    new, state, history = run_steps(tx, params, 3)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(history[-1][0]))
    mu = state.inner_state.inner_states["fft"].inner_state[0].mu
    assert mu["layers"]["0"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(state.scores)[np.asarray(routing_table(
        label_lora_experts, params).valid)]).all()
    assert np.asarray(state.winners).sum() == 4


def test_sharded_over_eight_devices_matches_one_device():
    assert len(jax.devices()) >= 8, "conftest sets 8 simulated CPU devices"
    params = small_model()
    tx = molf_adamw(label_lora_experts, fft_learning_rate=1e-2, lora_learning_rate=3e-2)
    want, want_state, _ = run_steps(tx, params, 4)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))

    def spec(x):
        # Shard the first axis on fsdp and the last on tensor where they divide.
        axes = [None] * x.ndim
        if x.ndim >= 1 and x.shape[0] % 4 == 0:
            axes[0] = "fsdp"
        if x.ndim >= 2 and x.shape[-1] % 2 == 0:
            axes[-1] = "tensor"
        return NamedSharding(mesh, P(*axes))

    sharded = jax.tree.map(lambda x: jax.device_put(x, spec(x)), params)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded))
    got, got_state, _ = run_steps(tx, sharded, 4)
    assert jax.tree.leaves(got)[0].sharding.device_set == set(mesh.devices.flat)
    np.testing.assert_array_equal(np.asarray(got_state.winners), np.asarray(want_state.winners))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=1e-6, atol=1e-7), got, want)


def test_stacked_leaves_route_each_layer_like_separate_modules():
    rng = np.random.default_rng(5)
    stacked = {"layers": {"q_proj": lora_module(rng, 6, 6, [2, 4], layers=3)}}
    unstacked = {"layers": {str(i): {"q_proj": jax.tree.map(lambda x: x[i],
                                                            stacked["layers"]["q_proj"])}
                            for i in range(3)}}
    tx = molf_adamw(label_lora_experts, fft_learning_rate=1e-2, lora_learning_rate=5e-2)
    table = routing_table(label_lora_experts, stacked)
    assert table.module_names == ("layers/0/q_proj", "layers/1/q_proj", "layers/2/q_proj")

    def grads_for(t):
        g = random_grads(stacked, t)
        return g, {"layers": {str(i): {"q_proj": jax.tree.map(lambda x: x[i],
                                                              g["layers"]["q_proj"])}
                              for i in range(3)}}

    s_state, u_state = tx.init(stacked), tx.init(unstacked)
    s_params, u_params = stacked, unstacked
    update = jax.jit(tx.update)
    seen = set()
    for t in range(6):
        gs, gu = grads_for(t)
        s_upd, s_state = update(gs, s_state, s_params)
        u_upd, u_state = update(gu, u_state, u_params)
        s_params = optax.apply_updates(s_params, s_upd)
        u_params = optax.apply_updates(u_params, u_upd)
        np.testing.assert_array_equal(np.asarray(s_state.winners), np.asarray(u_state.winners))
        seen.add(tuple(np.asarray(s_state.winners).argmax(axis=1)))
    assert len(seen) > 1, "layers should not all route alike at every step"
    for i in range(3):
        jax.tree.map(lambda s, u: np.testing.assert_allclose(np.asarray(s[i]), np.asarray(u),
                                                             rtol=1e-6, atol=1e-7),
                     s_params["layers"]["q_proj"], u_params["layers"][str(i)]["q_proj"])


def test_custom_score_gets_gradients_params_and_learning_rates():
    params = {"m": lora_module(np.random.default_rng(0), 4, 4, [2])}
    params["m"]["kernel"] = 10 * params["m"]["kernel"]  # a large base weighs in the param term
    seen = {}

    def combine(sums, info):
        seen["grad_sq"], seen["param_sq"] = sums
        seen["lr"], seen["count"], seen["n"] = info.learning_rate, info.count, info.num_params
        return (sums[0] + sums[1]) / info.num_params

    score = Score(elementwise=lambda mu, nu, g, p: (g * g, p * p), combine=combine,
                  uses_moments=False)
    tx = molf_route(optax.sgd(0.1), label_lora_experts, learning_rate={"fft": 0.1, "lora": 0.3},
                    score=score)
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["m"]["lora_1"]["a"] = jnp.ones((4, 2))  # only the LoRA expert has gradient
    updates, state = tx.update(grads, state, params)
    m = jax.tree.map(np.asarray, params["m"])
    np.testing.assert_allclose(np.asarray(seen["grad_sq"]), [[0.0, 8.0]])
    np.testing.assert_allclose(np.asarray(seen["param_sq"]), [[
        np.sum(m["kernel"] ** 2) + np.sum(m["bias"] ** 2),
        np.sum(m["lora_1"]["a"] ** 2) + np.sum(m["lora_1"]["b"] ** 2)]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(seen["n"]), [[20, 16]])
    np.testing.assert_allclose(np.asarray(seen["lr"]), [[0.1, 0.3]])
    assert int(seen["count"]) == 0
    # The gradient term alone favours the LoRA expert (0 vs 8/16); the parameter term decides.
    np.testing.assert_array_equal(np.asarray(state.winners), [[True, False]])
    assert np.all(np.asarray(updates["m"]["lora_1"]["a"]) == 0)  # the loser, despite its grad


def test_gate_form_differs_from_faithful_form():
    """Before a stock adamw, gating moves losers by momentum and decays their moments."""
    rng = np.random.default_rng(7)
    params = {"m": lora_module(rng, 6, 6, [2])}
    kernel_wins = {"m": {"kernel": 10.0, "bias": 10.0, "lora_1": {"a": 0.01, "b": 0.01}}}
    lora_wins = {"m": {"kernel": 0.01, "bias": 0.01, "lora_1": {"a": 10.0, "b": 10.0}}}

    def grads(params, scales):
        return jax.tree.map(lambda x, s: jnp.full_like(x, s), params, scales)

    faithful = molf_route(optax.adamw(1e-2), label_lora_experts, learning_rate=1e-2)
    gated = optax.chain(molf_gate(label_lora_experts, decay=0.0), optax.adamw(1e-2))
    results = {}
    for name, tx in (("faithful", faithful), ("gated", gated)):
        state = tx.init(params)
        p = params
        for scales in (kernel_wins, kernel_wins, lora_wins):
            updates, state = tx.update(grads(p, scales), state, p)
            p = optax.apply_updates(p, updates)
        results[name] = (updates, state)
    for name, (updates, state) in results.items():
        route_state = state if name == "faithful" else state[0]
        winners = np.asarray(route_state.winners)[0]
        loser = {0: updates["m"]["kernel"], 1: updates["m"]["lora_1"]["a"]}[int(winners.argmin())]
        if name == "faithful":
            assert np.all(np.asarray(loser) == 0)
        else:
            # Gated: the kernel lost on its tiny step-3 gradient but adamw's momentum moves it.
            assert winners.tolist() == [False, True]
            assert np.abs(np.asarray(loser)).min() > 1e-3
    # Losers' moments: the faithful form fed adamw the true gradient (0.01) at step 3, the gated
    # form fed it zero, so its first moment of the kernel only decayed.
    f_mu = results["faithful"][1].inner_state[0].mu["m"]["kernel"]
    g_mu = results["gated"][1][1][0].mu["m"]["kernel"]
    m2 = 0.9 * (0.1 * 10.0) + 0.1 * 10.0  # after two steps of gradient 10
    np.testing.assert_allclose(np.asarray(f_mu), 0.9 * m2 + 0.1 * 0.01, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_mu), 0.9 * m2, rtol=1e-5)


def test_errors_are_clear_and_early():
    params = small_model()
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        molf_route(optax.adamw(1e-3), label_lora_experts, learning_rate=1e-3, top_k=0)
    with pytest.raises(ValueError, match="top_k=3 is larger than the expert count 2"):
        molf_route(optax.adamw(1e-3), label_lora_experts, learning_rate=1e-3,
                   top_k=3).init(params)
    with pytest.raises(ValueError, match="unknown routing score 'nope'"):
        molf_route(optax.adamw(1e-3), label_lora_experts, learning_rate=1e-3, score="nope")
    with pytest.raises(ValueError, match="keeps none for routed leaf"):
        molf_route(optax.sgd(1e-3), label_lora_experts, learning_rate=1e-3).init(params)

    bad_labels = label_lora_experts(params)
    del bad_labels["norm"]
    with pytest.raises(ValueError, match="does not match the params tree.*norm/scale"):
        molf_route(optax.adamw(1e-3), bad_labels, learning_rate=1e-3).init(params)

    gap = {"m": {"kernel": jnp.zeros((4, 4)), "lora_2": {"a": jnp.zeros((4, 2)),
                                                          "b": jnp.zeros((2, 4))}}}
    with pytest.raises(ValueError, match="expert 1 has no leaves"):
        molf_route(optax.adamw(1e-3), label_lora_experts, learning_rate=1e-3).init(gap)

    mixed = {"m": {"kernel": jnp.zeros((4, 4)), "lora_1": {"a": jnp.zeros((4, 2)),
                                                           "b": jnp.zeros((2, 4), jnp.bfloat16)}}}
    with pytest.raises(ValueError, match="expert 1 of module 'm' mixes dtypes"):
        molf_route(optax.adamw(1e-3), label_lora_experts, learning_rate=1e-3).init(mixed)

    rank = {"m": {"kernel": jnp.zeros((4, 4)), "lora_1": {"a": jnp.zeros((4, 2)),
                                                          "b": jnp.zeros((3, 4))}}}
    with pytest.raises(ValueError, match="disagree on rank"):
        molf_route(optax.adamw(1e-3), label_lora_experts, learning_rate=1e-3).init(rank)

    with pytest.raises(ValueError, match="no entry for expert 1"):
        molf_route(optax.adamw(1e-3), label_lora_experts,
                   learning_rate={"fft": 1e-3}).init(params)


def _gate_reference(params, grads_per_step, decay, top_k):
    """NumPy restatement of `molf_gate`: per step, each expert's EMA of its mean squared
    gradient, bias-corrected, square-rooted; the top-k pass their gradients, the rest zero."""
    names = routing_table(label_lora_experts, params).module_names
    experts = {}  # (module, expert) -> leaf paths
    for path, label in _paths(label_lora_experts(params)).items():
        if label is not None:
            experts.setdefault((label.module, label.expert), []).append(path)
    width = 1 + max(e for _, e in experts)
    ema = np.zeros((len(names), width))
    wins = np.zeros((len(names), width), int)
    steps = []
    for t, grads in enumerate(grads_per_step, start=1):
        g = {p: np.asarray(x, np.float64) for p, x in _paths(grads).items()}
        mean_sq = np.zeros_like(ema)
        for (module, e), leaf_paths in experts.items():
            mean_sq[names.index(module), e] = (sum((g[p] ** 2).sum() for p in leaf_paths)
                                               / sum(g[p].size for p in leaf_paths))
        ema = decay * ema + (1 - decay) * mean_sq
        scores = np.full_like(ema, -np.inf)
        for module, e in experts:
            row = names.index(module)
            scores[row, e] = np.sqrt(ema[row, e] / (1 - decay ** t))
        winners = np.zeros_like(wins, bool)
        for row in range(len(names)):
            winners[row, np.argsort(-scores[row], kind="stable")[:top_k]] = True
        wins = wins + winners
        updates = dict(g)
        for (module, e), leaf_paths in experts.items():
            for p in leaf_paths:
                updates[p] = g[p] if winners[names.index(module), e] else np.zeros_like(g[p])
        steps.append(dict(count=t, grad_sq_ema=ema.copy(), scores=scores, winners=winners,
                          win_counts=wins.copy(), updates=updates))
    return steps


@pytest.mark.parametrize("decay, top_k", [(0.8, 1), (0.5, 2)])
def test_gate_state_and_updates_follow_its_rule_term_by_term(decay, top_k):
    """Every term of the gate's update pinned: the EMA and its decay, the mean over each
    expert's parameters, the bias correction, the square root, top-k and the gradient gate."""
    params = small_model()
    grads_per_step = [random_grads(params, t) for t in range(4)]
    tx = molf_gate(label_lora_experts, top_k=top_k, decay=decay)
    state = tx.init(params)
    update = jax.jit(tx.update)
    expected = _gate_reference(params, grads_per_step, decay, top_k)
    winners_seen = set()
    for t, (grads, want) in enumerate(zip(grads_per_step, expected), start=1):
        updates, state = update(grads, state, params)
        assert int(state.count) == want["count"]
        for field in ("grad_sq_ema", "scores"):
            np.testing.assert_allclose(np.asarray(getattr(state, field)), want[field],
                                       rtol=2e-5, err_msg=f"step {t} {field}")
        for field in ("winners", "win_counts"):
            np.testing.assert_array_equal(np.asarray(getattr(state, field)), want[field],
                                          err_msg=f"step {t} {field}")
        for path, value in _paths(updates).items():
            np.testing.assert_allclose(np.asarray(value), want["updates"][path], rtol=1e-6,
                                       err_msg=f"step {t} {path}")
        winners_seen.add(np.asarray(state.winners).tobytes())
    # The case is informative: the winners change across steps.
    assert len(winners_seen) > 1
