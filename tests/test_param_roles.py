"""Parameter roles: one tree, computed once, says what trains, which expert, which AdamW group."""

import jax
import jax.numpy as jnp
import pytest

from molf_jax import models
from molf_jax.adalora import AdaLoraSpec, add_adalora
from molf_jax.lora import LoraExpert, LoraSpec, add_lora_experts, lora_paths
from molf_jax.param_roles import expert_labels, optimizer_groups, split_trainable
from molf_jax.routing import ExpertLabel
from molf_jax.train import TrainConfig, mode_roles
from molf_jax.trees import tree_paths


def tiny_base(scan=False):
    config = models.Qwen2Config(vocab_size=32, hidden_size=8, intermediate_size=12,
                                num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                                tie_word_embeddings=False)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), models.abstract_params(
        models.build_model(config, scan_layers=scan)))


def tiny_params(scan=False):
    spec = LoraSpec(experts=(LoraExpert(2, 4), LoraExpert(4, 4)))
    return add_lora_experts(tiny_base(scan), spec, jax.random.key(0))


def trainable_paths(config, params):
    return set(tree_paths(split_trainable(params, mode_roles(config, params))[0]))


def test_each_mode_trains_the_leaves_its_table_row_names():
    params = tiny_params()
    every = set(tree_paths(params))
    lora = {p for p in every if "/lora_" in p}
    targets = {p.rsplit("/", 2)[0] for p in lora_paths(params)}  # module/lora_i/leaf
    others = {p for p in every if p.rsplit("/", 1)[0] not in targets and p not in lora}
    assert len(targets) == 2 * 7 and others >= {"embed_tokens/embedding", "norm/scale",
                                                "lm_head/kernel"}
    assert trainable_paths(TrainConfig(mode="fft"), params) == every
    assert trainable_paths(TrainConfig(mode="molf", lora_ranks=(2, 4)), params) == every
    assert trainable_paths(TrainConfig(mode="lora", lora_ranks=(2,)), params) == lora
    assert trainable_paths(TrainConfig(mode="molfe"), params) == lora
    assert trainable_paths(TrainConfig(mode="molfe", train_embeddings_norms=True),
                           params) == lora | others


def test_adalora_trains_its_triplets_alone_in_the_lora_group():
    params = add_adalora(tiny_base(), AdaLoraSpec(init_r=2), jax.random.key(0))
    every = set(tree_paths(params))
    triplets = {p for p in every if "/adalora/" in p}
    assert len(triplets) == 2 * 7 * 3  # layers x projections x (a, e, b)
    roles = mode_roles(TrainConfig(mode="adalora"), params)
    assert set(tree_paths(split_trainable(params, roles)[0])) == triplets
    groups = optimizer_groups(roles)
    assert set(jax.tree.leaves(groups)) == {"lora"}
    assert all(label is None for label in jax.tree.leaves(
        expert_labels(roles), is_leaf=lambda x: x is None))


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_labels_and_groups_of_molf_and_molfe(scan):
    params = tiny_params(scan)
    prefix = "layers" if scan else "layers/0"
    module = f"{prefix.replace('layers', 'layers/*') if scan else prefix}/self_attn/q_proj"
    molf = expert_labels(mode_roles(TrainConfig(mode="molf", lora_ranks=(2, 4)), params))
    node = molf["layers"] if scan else molf["layers"]["0"]
    q = node["self_attn"]["q_proj"]
    assert q["kernel"] == q["bias"] == ExpertLabel(module, 0, scan)
    assert q["lora_2"]["a"] == ExpertLabel(module, 2, scan)
    assert molf["norm"]["scale"] is None and molf["embed_tokens"]["embedding"] is None
    # MoLF-E: the frozen kernel is no expert; the routed modules hold LoRA experts only.
    molfe = expert_labels(mode_roles(TrainConfig(mode="molfe"), params))
    q = (molfe["layers"] if scan else molfe["layers"]["0"])["self_attn"]["q_proj"]
    assert set(q) == {"lora_1", "lora_2"} and q["lora_1"]["b"] == ExpertLabel(module, 1, scan)

    groups = optimizer_groups(mode_roles(TrainConfig(mode="fft"), params))
    layer = groups["layers"] if scan else groups["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["kernel"] == "fft"
    assert layer["self_attn"]["q_proj"]["bias"] == "fft_no_decay"
    assert layer["self_attn"]["q_proj"]["lora_1"]["a"] == "lora"
    assert groups["norm"]["scale"] == "fft_no_decay" and groups["lm_head"]["kernel"] == "fft"


def test_projection_names_are_the_linears_the_model_builds():
    params = tiny_params()
    linears = {p.split("/")[-2] for p in tree_paths(params) if p.startswith("layers/0/")
               and p.endswith("/kernel")}
    assert linears == set(models.PROJECTIONS)
    assert LoraSpec().targets == models.PROJECTIONS == TrainConfig().lora_targets
