"""molf_route against an independent NumPy restatement of docs/design.md section 1.

The reference below shares no code with the library: it keeps its own Adam moments, its own
schedule, its own scores and top-k, written step by step from the design notes.

It runs twice: in float64 (JAX x64 mode), where transform and reference agree to 1e-6 relative
with room to spare, and in float32. In float32 the bound is 3e-5: optax's bias correction
1 - 0.999**t goes through XLA's float32 pow, which differs from NumPy's by up to 7e-6 relative
at t=1 and compounds over steps; the routing itself adds nothing (winners are identical).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from molf_jax.routing import ExpertLabel, labels_from_paths, molf_adamw, molf_route, routing_table

B1, B2, ADAM_EPS, SCORE_EPS = 0.9, 0.999, 1e-8, 1e-8
FFT_LR, LORA_LR, FFT_WD, LORA_WD = 2e-2, 5e-2, 0.1, 0.01
WARMUP, TOTAL, STEPS = 3, 12, 12

# name -> {expert index: {leaf name: shape}}; m3 is LoRA-only (MoLF-Efficient).
MODULES = {
    "m1": {0: {"kernel": (6, 5), "bias": (5,)}, 1: {"a": (6, 2), "b": (2, 5)},
           2: {"a": (6, 4), "b": (4, 5)}},
    "m2": {0: {"kernel": (5, 4)}, 1: {"a": (5, 3), "b": (3, 4)}},
    "m3": {1: {"a": (4, 2), "b": (2, 6)}, 2: {"a": (4, 8), "b": (8, 6)},
           3: {"a": (4, 3), "b": (3, 6)}},
}
UNROUTED = {"norm/scale": (5,), "embed/embedding": (7, 6)}


def reference_schedule(peak, t):
    """Linear warm-up from 0 over WARMUP steps, then cosine to 0 at TOTAL (t counts from 0)."""
    if t < WARMUP:
        return peak * t / WARMUP
    frac = min(t - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
    return peak * 0.5 * (1 + math.cos(math.pi * frac))


def leaf_names():
    names = {}
    for module, experts in MODULES.items():
        for expert, leaves in experts.items():
            for leaf in leaves:
                key = f"{module}/{leaf}" if expert == 0 else f"{module}/lora_{expert}/{leaf}"
                names[key] = (module, expert, leaves[leaf])
    for key, shape in UNROUTED.items():
        names[key] = (None, None, shape)
    return names


def make_problem(seed, dtype):
    rng = np.random.default_rng(seed)
    names = leaf_names()
    params = {k: (rng.normal(size=shape) * 0.5).astype(dtype) for k, (_, _, shape) in names.items()}
    grads = []
    for step in range(STEPS):
        # Random per-expert gradient scales so that winners change from step to step.
        scale = {(m, e): math.exp(rng.normal() * 2.0)
                 for m, experts in MODULES.items() for e in experts}
        # A third of the entries are zero: at step 1 PFN is otherwise the same constant for
        # every expert, sqrt((1 - b1)^2 / (1 - b2)), and ties would be settled by rounding.
        grads.append({k: (rng.normal(size=shape) * (rng.random(shape) > 0.33)
                          * (scale[(m, e)] if m else 1.0)).astype(dtype)
                      for k, (m, e, shape) in names.items()})
    return names, params, grads


def lr_of(module, expert, t):
    return reference_schedule(FFT_LR if not expert else LORA_LR, t)


def wd_of(key, expert):
    if expert:
        return LORA_WD
    return 0.0 if key.endswith(("bias", "scale")) else FFT_WD


def reference_run(names, params, grads, top_k, score):
    """Runs in the dtype of ``params``: every constant is cast to it before use."""
    dt = next(iter(params.values())).dtype.type
    b1, b2, eps = dt(B1), dt(B2), dt(ADAM_EPS)
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    winners_per_step = []
    for t, g in enumerate(grads):
        # 1. moments of every leaf, winners or not.
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
        # 2. scores per module and expert from the raw moments.
        winners = {}
        for module, experts in MODULES.items():
            scores = {}
            for expert in experts:
                keys = [k for k, (mm, e, _) in names.items() if mm == module and e == expert]
                n = sum(p[k].size for k in keys)
                if score == "epd":
                    s = sum(np.sum(m[k].astype(float) ** 2 / (np.sqrt(v[k].astype(float))
                                                              + SCORE_EPS)) for k in keys)
                    scores[expert] = lr_of(module, expert, t) * s / n
                else:
                    s = sum(np.sum((m[k].astype(float) / (np.sqrt(v[k].astype(float))
                                                          + SCORE_EPS)) ** 2) for k in keys)
                    scores[expert] = math.sqrt(s) / math.sqrt(n)
            # 3. top-k, ties to the lower index.
            order = sorted(scores, key=lambda e: (-scores[e], e))
            winners[module] = set(order[:top_k])
        winners_per_step.append(winners)
        # 4. AdamW on winners (and on unrouted leaves); losers stay put.
        for k, (module, expert, _) in names.items():
            if module is not None and expert not in winners[module]:
                continue
            lr = dt(lr_of(module, expert, t))
            m_hat = m[k] / (1 - b1 ** dt(t + 1))
            v_hat = v[k] / (1 - b2 ** dt(t + 1))
            step = m_hat / (np.sqrt(v_hat) + eps) + dt(wd_of(k, expert)) * p[k]
            p[k] = (p[k] - lr * step).astype(dt)
    return p, winners_per_step


def to_tree(flat):
    tree = {}
    for key, value in flat.items():
        node = tree
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = jnp.asarray(value)
    return tree


def from_tree(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def label(path, leaf):
    parts = path.split("/")
    if parts[0] not in MODULES:
        return None
    expert = int(parts[1].split("_")[1]) if parts[1].startswith("lora_") else 0
    return ExpertLabel(parts[0], expert)


def schedule(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, WARMUP, TOTAL, end_value=0.0)


def documented_recipe(top_k, score):
    """The README's 'Routing any pytree' recipe: optax.partition of adamw + molf_route."""
    def group(path, leaf):
        lab = label(path, leaf)
        if lab is not None and lab.expert > 0:
            return "lora"
        return "no_decay" if path.endswith(("bias", "scale")) else "fft"

    inner = optax.partition(
        {"fft": optax.adamw(schedule(FFT_LR), weight_decay=FFT_WD),
         "no_decay": optax.adamw(schedule(FFT_LR), weight_decay=0.0),
         "lora": optax.adamw(schedule(LORA_LR), weight_decay=LORA_WD)},
        lambda params: labels_from_paths(params, group))
    return molf_route(inner, lambda params: labels_from_paths(params, label),
                      learning_rate={"fft": schedule(FFT_LR), "lora": schedule(LORA_LR)},
                      top_k=top_k, score=score)


def one_call_recipe(top_k, score):
    return molf_adamw(lambda params: labels_from_paths(params, label),
                      fft_learning_rate=schedule(FFT_LR), lora_learning_rate=schedule(LORA_LR),
                      fft_weight_decay=FFT_WD, lora_weight_decay=LORA_WD, top_k=top_k,
                      score=score)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-6), (np.float32, 3e-5)])
@pytest.mark.parametrize("builder", [documented_recipe, one_call_recipe])
@pytest.mark.parametrize("top_k,score", [(1, "epd"), (1, "pfn"), (2, "epd"), (2, "pfn")])
def test_molf_route_matches_numpy_reference(builder, top_k, score, dtype, rtol):
    with jax.enable_x64(dtype == np.float64):
        run_and_compare(builder, top_k, score, dtype, rtol)


def run_and_compare(builder, top_k, score, dtype, rtol):
    names, params, grads = make_problem(top_k * 10 + len(score), dtype)
    expected, expected_winners = reference_run(names, params, grads, top_k, score)

    tx = builder(top_k, score)
    tree = to_tree(params)
    state = tx.init(tree)
    rows = routing_table(lambda p: labels_from_paths(p, label), tree).module_names

    @jax.jit
    def step(tree, state, g):
        updates, state = tx.update(g, state, tree)
        return optax.apply_updates(tree, updates), state

    switches = 0
    for t, g in enumerate(grads):
        tree, state = step(tree, state, to_tree(g))
        got = {rows[r]: set(np.flatnonzero(np.asarray(state.winners[r])).tolist())
               for r in range(len(rows))}
        assert got == expected_winners[t], f"winners differ at step {t}"
        if t:
            switches += sum(expected_winners[t][m] != expected_winners[t - 1][m] for m in MODULES)
    assert switches >= 3, "the problem should make winners change often"

    got = from_tree(tree)
    for key in expected:
        assert got[key].dtype == dtype, key
        # Relative to each tensor's scale: an element that passed through values near 1 carries
        # rounding of that size whatever its final value.
        scale = np.abs(expected[key]).max()
        np.testing.assert_allclose(got[key], expected[key], rtol=rtol, atol=rtol * scale,
                                   err_msg=key)
