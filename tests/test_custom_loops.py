"""The optimizer in the loops people write (issue 27): a linen and an NNX model of the user's
own, experts added, labels, a partition that freezes part of the model, jit, a mesh.

Each case trains a few steps and checks what the user checks: it runs, the loss falls, frozen
leaves stay bitwise unchanged, the winners are readable from the state, and a sharded run
equals the unsharded one.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from molf_jax import models
from molf_jax.cli import main as cli_main
from molf_jax.experts import LoraExperts, add_nnx_lora_experts, check_experts_used, lora_experts
from molf_jax.lora import LoraExpert, LoraSpec, add_lora_experts
from molf_jax.routing import (ExpertLabel, MolfRouteState, Score, label_lora_experts, molf_adamw,
                              molf_route, param_groups, routing_table, sharded_init,
                              state_shardings)

SPEC = LoraSpec(experts=(LoraExpert(2, 4), LoraExpert(4, 8)), targets=("fc1", "fc2"),
                dropout=0.0)


class MLP(nn.Module):
    """A user's own linen model: stock Dense layers and a LayerNorm."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(1, name="fc2")(x)


class NnxMLP(nnx.Module):
    """The same model in NNX."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.norm(jax.nn.relu(self.fc1(x))))


def data(n=32):
    x = jax.random.normal(jax.random.key(0), (n, 8))
    return x, jnp.sum(x[:, :3], -1, keepdims=True)


def route_state(state) -> MolfRouteState:
    return optax.tree_utils.tree_get(state, "MolfRouteState")


def freeze_norm_and_fc2_kernel(params):
    def label(path, _):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        return "frozen" if name.startswith("norm") or name == "fc2/kernel" else "molf"
    return jax.tree_util.tree_map_with_path(label, params)


def linen_setup():
    x, y = data()
    model = MLP()
    params = add_lora_experts(model.init(jax.random.key(1), x)["params"], SPEC,
                              jax.random.key(2))

    def loss_fn(params, x, y):
        with lora_experts(SPEC):
            return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    return params, loss_fn, (x, y)


def train(tx, params, loss_fn, batch, steps=6):
    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state, curve = tx.init(params), []
    for _ in range(steps):
        params, state, loss = step(params, state, *batch)
        curve.append(float(loss))
    return params, state, curve


def test_linen_model_with_experts_trains_inside_a_freezing_partition():
    params, loss_fn, batch = linen_setup()
    check_experts_used(loss_fn, params, *batch)
    tx = optax.partition({"molf": molf_adamw(label_lora_experts, fft_learning_rate=1e-2,
                                             lora_learning_rate=1e-2),
                          "frozen": optax.set_to_zero()}, freeze_norm_and_fc2_kernel)
    trained, state, curve = train(tx, params, loss_fn, batch)
    assert curve[-1] < 0.8 * curve[0], curve
    for frozen in (("norm", "scale"), ("norm", "bias"), ("fc2", "kernel")):
        np.testing.assert_array_equal(trained[frozen[0]][frozen[1]],
                                      params[frozen[0]][frozen[1]])
    winners = np.asarray(route_state(state).winners)
    # fc1 routes among FFT + 2 LoRA experts; fc2's FFT expert is frozen (its bias alone would
    # be expert 0: kernel frozen, bias trained), so each row has exactly one winner.
    assert winners.shape == (2, 3) and winners.sum(axis=1).tolist() == [1, 1]
    assert route_state(state).win_counts.sum() == 2 * 6


def test_experts_the_forward_pass_never_reads_fail_before_training():
    params, _, (x, y) = linen_setup()
    stock = lambda p, x: MLP().apply({"params": p}, x)  # no lora_experts context
    with pytest.raises(ValueError, match=r"never reads: fc1 expert 1, fc1 expert 2, fc2 "
                                         r"expert 1.*lora_experts\(spec\)"):
        check_experts_used(stock, params, x)
    # Half the experts used is still an error, naming only the unused ones.
    with pytest.raises(ValueError, match=r"never reads: fc2 expert 1, fc2 expert 2 \(of 4\)"):
        check_experts_used(_apply_with(LoraSpec(experts=SPEC.experts, targets=("fc1",))),
                           params, x)


def _apply_with(spec):
    def apply(params, x):
        with lora_experts(spec):
            return MLP().apply({"params": params}, x)
    return apply


def test_lora_experts_init_makes_the_leaves_add_lora_experts_makes():
    x, _ = data()
    with lora_experts(SPEC):
        params = MLP().init(jax.random.key(1), x)["params"]
    added = add_lora_experts(MLP().init(jax.random.key(1), x)["params"], SPEC, jax.random.key(2))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, added)
    # b starts at zero: the experts leave the output unchanged until they train.
    np.testing.assert_array_equal(_apply_with(SPEC)(params, x), MLP().apply({"params": params}, x))


def test_lora_experts_compute_the_scaled_sum():
    params, _, (x, _) = linen_setup()
    params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero b
    fc1 = params["fc1"]
    want = x @ fc1["kernel"] + fc1["bias"] + sum(
        s * (x @ fc1[f"lora_{i}"]["a"]) @ fc1[f"lora_{i}"]["b"]
        for i, s in enumerate(SPEC.scales, start=1))

    class FirstLayer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="fc1")(x)

    with lora_experts(SPEC):
        got = FirstLayer().apply({"params": {"fc1": fc1}}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nnx_lora_experts_compute_the_scaled_sum():
    linear = nnx.Linear(8, 16, rngs=nnx.Rngs(0))
    kernel, bias = linear.kernel[...], linear.bias[...]
    fc = LoraExperts(linear, SPEC, rngs=nnx.Rngs(1))
    for i in (1, 2):
        lora = getattr(fc, f"lora_{i}")
        lora.lora_b[...] = jax.random.normal(jax.random.key(i), lora.lora_b.shape)
    x, _ = data()
    want = x @ kernel + bias + sum(
        s * (x @ getattr(fc, f"lora_{i}").lora_a[...]) @ getattr(fc, f"lora_{i}").lora_b[...]
        for i, s in enumerate(SPEC.scales, start=1))
    np.testing.assert_allclose(fc(x), want, rtol=1e-5, atol=1e-5)


def test_nnx_optimizer_trains_with_molf_adamw():
    x, y = data()
    model = NnxMLP(nnx.Rngs(0))
    assert add_nnx_lora_experts(model, SPEC, rngs=nnx.Rngs(1)) == ["fc1", "fc2"]
    optimizer = nnx.Optimizer(model, molf_adamw(label_lora_experts, fft_learning_rate=1e-2,
                                                lora_learning_rate=1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    curve = [float(step(model, optimizer, x, y)) for _ in range(6)]
    assert curve[-1] < 0.8 * curve[0], curve
    state = route_state(nnx.as_pure(optimizer.opt_state))
    assert state.winners.shape == (2, 3) and int(state.win_counts.sum()) == 2 * 6
    table = routing_table(label_lora_experts, nnx.state(model, nnx.Param))
    assert table.module_names == ("fc1", "fc2")


def test_nnx_paths_get_the_linen_weight_decay_groups():
    """Biases and norm scales take no decay whether the tree holds nnx Variables (what init
    sees) or pure arrays (what update sees)."""
    model = NnxMLP(nnx.Rngs(0))
    add_nnx_lora_experts(model, SPEC, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    for tree in (state, nnx.as_pure(state)):
        groups = jax.tree_util.tree_leaves_with_path(param_groups(tree, label_lora_experts))
        named = {jax.tree_util.keystr(p, simple=True, separator="/").removesuffix("/value"): g
                 for p, g in groups}
        assert named["fc1/base_module/bias"] == "fft_no_decay"
        assert named["norm/scale"] == named["norm/bias"] == "fft_no_decay"
        assert named["fc1/base_module/kernel"] == "fft"
        assert named["fc2/lora_2/lora_b"] == "lora"


def test_nnx_lora_modules_are_experts():
    class WithLora(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.LoRA(8, 2, 4, base_module=nnx.Linear(8, 4, rngs=rngs), rngs=rngs)
            self.out = nnx.LoRALinear(4, 1, lora_rank=2, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.fc(x)))

    model = WithLora(nnx.Rngs(0))
    labels = label_lora_experts(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): l
            for p, l in jax.tree_util.tree_leaves_with_path(labels)}
    assert flat["fc/base_module/kernel/value"] == ExpertLabel("fc", 0)
    assert flat["fc/lora_a/value"] == flat["fc/lora_b/value"] == ExpertLabel("fc", 1)
    assert flat["out/kernel/value"] == ExpertLabel("out", 0)
    assert flat["out/lora/lora_a/value"] == ExpertLabel("out", 1)

    x, y = data()
    optimizer = nnx.Optimizer(model, molf_adamw(label_lora_experts, fft_learning_rate=1e-2,
                                                lora_learning_rate=1e-2), wrt=nnx.Param)
    before = float(jnp.mean((model(x) - y) ** 2))
    for _ in range(4):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
    assert float(jnp.mean((model(x) - y) ** 2)) < before


def test_peft_names_label_and_spec():
    tree = {"q_proj": {"base_layer": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)},
                       "lora_A": {"default": {"kernel": jnp.zeros((4, 2))}},
                       "lora_B": {"default": {"kernel": jnp.zeros((2, 4))}}}}
    labels = label_lora_experts(tree)
    assert labels["q_proj"]["base_layer"]["bias"] == ExpertLabel("q_proj", 0)
    assert labels["q_proj"]["lora_B"]["default"]["kernel"] == ExpertLabel("q_proj", 1)
    with pytest.raises(ValueError, match="claim LoRA expert 1"):
        label_lora_experts({"m": {"lora_a": 1, "lora_b": 2, "lora_1": {"a": 3}}})

    spec = LoraSpec.from_peft(r=(16, 128), lora_alpha=(32, 256), target_modules=["fc1"],
                              lora_dropout=0.05, use_rslora=True)
    assert spec == LoraSpec(experts=(LoraExpert(16, 32), LoraExpert(128, 256)),
                            targets=("fc1",), dropout=0.05, rslora=True)
    import peft
    from_config = LoraSpec.from_peft(peft.LoraConfig(r=8, lora_alpha=16,
                                                     target_modules=["v", "q"]))
    assert from_config.experts == (LoraExpert(8, 16),) and from_config.targets == ("q", "v")
    assert not from_config.rslora and from_config.dropout == 0.0
    default = LoraSpec.from_peft(r=8)  # peft's defaults, not ours
    assert default.experts == (LoraExpert(8, 8),) and not default.rslora
    assert default.dropout == 0.0 and default.targets == LoraSpec().targets
    with pytest.raises(ValueError, match="use_dora"):
        LoraSpec.from_peft(peft.LoraConfig(r=8, use_dora=True))
    with pytest.raises(ValueError, match="unknown field"):
        LoraSpec.from_peft(rank=8)


def test_sharded_loop_equals_unsharded_and_keeps_the_state_sharded():
    params, loss_fn, batch = linen_setup()
    tx = optax.partition({"molf": molf_adamw(label_lora_experts, fft_learning_rate=1e-2,
                                             lora_learning_rate=1e-2),
                          "frozen": optax.set_to_zero()}, freeze_norm_and_fc2_kernel)
    want, want_state, _ = train(tx, params, loss_fn, batch, steps=3)

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    # FSDP: split each leaf's first axis over 'fsdp' where it divides.
    spec = lambda x: P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P()
    sharded = jax.device_put(params, jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), params))
    state = sharded_init(tx, sharded)
    mu = optax.tree_utils.tree_get_all_with_path(state, "mu")
    fc1_mu = [m["fc1"]["kernel"] for _, m in mu if not isinstance(m["fc1"]["kernel"],
                                                                 optax.MaskedNode)][0]
    assert fc1_mu.sharding.spec == P("fsdp") and fc1_mu.sharding.mesh == mesh
    shardings = state_shardings(tx, sharded)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, out_shardings=(jax.tree.map(lambda x: x.sharding, sharded), shardings))
    x, y = (jax.device_put(b, NamedSharding(mesh, P("data"))) for b in batch)
    for _ in range(3):
        sharded, state = step(sharded, state, x, y)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 sharded, want)
    np.testing.assert_array_equal(route_state(state).win_counts,
                                  route_state(want_state).win_counts)


@pytest.mark.parametrize("combine,says", [
    (lambda sums, info: sums[0], r"combine returned float32\[3\]; it must return a float "
                                 r"array \[modules, experts\] = \[2, 3\]"),
    (lambda sums, info: (sums > 0).astype(jnp.int32), r"combine returned int32\[2, 3\]"),
])
def test_a_custom_score_of_the_wrong_shape_or_dtype_is_named(combine, says):
    params, loss_fn, batch = linen_setup()
    score = Score(elementwise=lambda mu, nu, g, p: g * g, combine=combine, uses_moments=False)
    tx = molf_route(optax.adamw(1e-2), label_lora_experts, learning_rate=1e-2, score=score)
    with pytest.raises(ValueError, match=r"score '.*test_custom_loops:.*<lambda>': " + says):
        train(tx, params, loss_fn, batch, steps=1)


def test_a_custom_elementwise_of_the_wrong_shape_is_named():
    params, loss_fn, batch = linen_setup()
    score = Score(elementwise=lambda mu, nu, g, p: jnp.sum(g, axis=0, keepdims=True).T,
                  combine=lambda sums, info: sums, uses_moments=False)
    tx = molf_route(optax.adamw(1e-2), label_lora_experts, learning_rate=1e-2, score=score)
    with pytest.raises(ValueError, match=r"elementwise returned float32\[16, 1\] for leaf "
                                         r"'fc1/kernel' of shape \[8, 16\]"):
        train(tx, params, loss_fn, batch, steps=1)


def test_tiny_qwen2_preset_trains_end_to_end_from_the_cli(tmp_path):
    out = tmp_path / "run"
    status = cli_main(["train", "--model", "tiny-qwen2", "--mesh", "fsdp=1", "--steps", "3",
                       "--batch-size", "4", "--task-size", "8", "--no-eval", "--no-export",
                       "--out-dir", str(out)])
    assert status == 0
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]
    assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.parametrize("name,family", [("tiny-qwen2", "qwen2"), ("tiny-gemma3", "gemma3")])
def test_tiny_presets_fit_the_byte_tokenizer(name, family):
    from molf_jax.data import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    config = models.preset(name)
    assert models.family_of(config).name == family and config.num_layers == 2
    assert config.vocab_size == len(tokenizer)
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (
        tokenizer.pad_token_id, (tokenizer.eos_token_id,), tokenizer.bos_token_id)
    model = models.build_model(config)
    params = models.init_params(model, jax.random.key(0))
    ids = jnp.asarray(tokenizer("hello", add_special_tokens=False)["input_ids"])[None]
    logits = model.apply({"params": params}, ids, jnp.ones_like(ids))
    assert logits.shape == (1, 5, 260) and bool(jnp.isfinite(logits).all())


def test_unknown_model_lists_the_presets(capsys, tmp_path):
    status = cli_main(["train", "--model", "tiny", "--steps", "1", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and "tiny-qwen2" in err and "tiny-gemma3" in err and "qwen2.5-0.5b" in err
