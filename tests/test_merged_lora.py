"""The merged LoRA linear: gradients equal the factored form's, plain evaluation stays factored,
dropout keeps the factored path, and the training modes pick it only where the kernel trains."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lora import random_params, tiny_config, with_random_b

from molf_jax import models
from molf_jax.lora import LoraExpert, LoraSpec
from molf_jax.models.merged_lora import merged_lora_linear
from molf_jax.train import TrainConfig
from molf_jax.train.modes import lora_spec

SCALES = (0.5, 2.0)


def operands():
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (2, 5, 8))
    kernel = jax.random.normal(k[1], (8, 6))
    a = (jax.random.normal(k[2], (8, 2)), jax.random.normal(k[3], (8, 3)))
    b = (jax.random.normal(k[4], (2, 6)), jax.random.normal(k[5], (3, 6)))
    return x, kernel, a, b


def factored(x, kernel, a, b):
    y = x @ kernel
    for a_i, b_i, s_i in zip(a, b, SCALES):
        y = y + s_i * (x @ a_i) @ b_i
    return y


def merged(x, kernel, a, b):
    return merged_lora_linear(x, kernel, a, b, SCALES)


def merged_and_kept(x, kernel, a, b):
    return merged_lora_linear(x, kernel, a, b, SCALES, True)


def loss_of(linear):
    return lambda *args: 0.5 * jnp.sum(linear(*args) ** 2)


@pytest.mark.parametrize("linear", [merged, merged_and_kept], ids=["rebuilt", "kept"])
def test_gradients_of_every_input_equal_the_factored_form(linear):
    args = operands()
    got = jax.grad(loss_of(linear), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss_of(factored), argnums=(0, 1, 2, 3))(*args)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
    np.testing.assert_allclose(linear(*args), factored(*args), rtol=1e-5, atol=1e-5)


def kernel_sized_products(fn, *args):
    """How many dot products in ``fn``'s jaxpr produce an [in, out] = [8, 6] array (or its
    transpose)."""
    text = str(jax.make_jaxpr(fn)(*args))
    return text.count("f32[8,6] = dot_general") + text.count("f32[6,8] = dot_general")


def test_only_differentiation_builds_the_merged_kernel():
    args = operands()
    assert kernel_sized_products(merged, *args) == 0
    # forward: one product merges all experts; backward: merge again, and x^T dy
    assert kernel_sized_products(jax.grad(loss_of(merged), argnums=1), *args) == 3
    # kept for the backward pass: no second merge
    assert kernel_sized_products(jax.grad(loss_of(merged_and_kept), argnums=1), *args) == 2
    assert kernel_sized_products(jax.grad(loss_of(factored), argnums=1), *args) == 1


def model_gradients(spec, params, ids, remat="none", **apply_kwargs):
    model = models.build_model(tiny_config(), lora=spec, remat=remat)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, ids, **apply_kwargs) ** 2)
    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize("remat", ["none", "full", "dots_saveable"])
def test_model_with_merged_spec_has_the_same_loss_and_gradients(remat):
    spec = LoraSpec(experts=(LoraExpert(2, 4), LoraExpert(4, 16)), dropout=0.0)
    params = with_random_b(random_params(models.build_model(tiny_config(), lora=spec)))
    ids = jnp.arange(12).reshape(2, 6)
    loss, grads = model_gradients(dataclasses.replace(spec, merged=True), params, ids, remat)
    loss_ref, grads_ref = model_gradients(spec, params, ids)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
    flat, flat_ref = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_ref)
    assert any("lora_2" in jax.tree_util.keystr(p) for p, _ in flat)
    for (path, g), w in zip(flat, flat_ref):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_active_dropout_keeps_the_factored_path():
    spec = LoraSpec(experts=(LoraExpert(4, 8),), dropout=0.5)
    params = with_random_b(random_params(models.build_model(tiny_config(), lora=spec)))
    ids = jnp.arange(12).reshape(2, 6)
    kwargs = dict(deterministic=False, rngs={"dropout": jax.random.key(3)})
    loss, grads = model_gradients(dataclasses.replace(spec, merged=True), params, ids, **kwargs)
    loss_ref, grads_ref = model_gradients(spec, params, ids, **kwargs)
    loss_no_dropout, _ = model_gradients(spec, params, ids)
    assert abs(float(loss_ref) - float(loss_no_dropout)) > 1e-3  # the mask matters here
    np.testing.assert_array_equal(loss, loss_ref)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("mode, merged_lora, expected", [
    ("molf", True, True), ("molf_gate", True, True), ("molf", False, False),
    ("lora", True, False), ("molfe", True, False)])
def test_modes_merge_only_where_the_kernel_trains(mode, merged_lora, expected):
    spec = lora_spec(TrainConfig(mode=mode, merged_lora=merged_lora))
    assert spec.merged is expected
