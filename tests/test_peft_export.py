"""PEFT adapter export, checked by loading it with peft on the torch model.

Tiny random Qwen2 and Gemma 3 checkpoints (built with transformers, saved locally) are loaded
into Flax, given LoRA experts with non-zero ``b``, and exported; ``PeftModel.from_pretrained``
on the torch base must then give the logits of the merged model (``save_hf`` read back by
transformers) and of our own LoRA forward pass.
"""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tiny_hf import gemma3_config, hf_logits, padded_batch, qwen2_config, random_model, save

from molf_jax import models
from molf_jax.checkpoints import load_hf, save_hf
from molf_jax.checkpoints.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_peft_adapter
from molf_jax.train.export import export_artifacts
from molf_jax.lora import LoraExpert, LoraSpec, add_lora_experts, strip_lora
from molf_jax.train import TrainConfig, mode_roles

TORCH_TOL = 1e-5  # peft vs transformers on the merged folder: same framework, same float32
FLAX_TOL = 1e-4  # peft vs our Flax forward: the cross-framework tolerance of the model tests
ONE = LoraSpec(experts=(LoraExpert(4, 8),), dropout=0.0)
TWO = LoraSpec(experts=(LoraExpert(2, 3), LoraExpert(6, 24)), dropout=0.0)
TWO_CLASSIC = LoraSpec(experts=(LoraExpert(2, 3), LoraExpert(6, 24)), rslora=False, dropout=0.0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    return {"qwen2": save(random_model(qwen2_config()), root / "qwen2"),
            "gemma3": save(random_model(gemma3_config()), root / "gemma3")}


def trained(folder, spec, scan=False, seed=1):
    """Base params from ``folder`` plus experts whose ``b`` is random (as after training)."""
    config, params = load_hf(folder, scan_layers=scan)
    params = add_lora_experts(params, spec, jax.random.key(seed))
    rng = np.random.RandomState(seed)

    def perturb(path, leaf):
        if getattr(path[-1], "key", None) != "b":
            return leaf
        return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return config, jax.tree_util.tree_map_with_path(perturb, params)


def peft_model(folder, adapter_dir):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base.eval(), adapter_dir).eval()


@pytest.mark.parametrize("name,spec", [("qwen2", ONE), ("qwen2", TWO), ("gemma3", ONE),
                                       ("gemma3", TWO_CLASSIC)],
                         ids=["qwen2-one", "qwen2-two", "gemma3-one", "gemma3-two-classic"])
def test_peft_adapter_gives_the_merged_models_logits(folders, tmp_path, name, spec):
    config, params = trained(folders[name], spec)
    _, base_params = load_hf(folders[name])
    adapter = save_peft_adapter(tmp_path / "adapter", params, config, spec,
                                base_model_name_or_path=str(folders[name]),
                                base_params=base_params)
    merged = save_hf(tmp_path / "merged", params, config, lora=spec)
    ids, mask = padded_batch(length=10)

    with_adapter = hf_logits(peft_model(folders[name], adapter), ids, mask)
    merged_torch = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    reference = hf_logits(merged_torch, ids, mask)
    ours = np.asarray(jax.jit(models.build_model(config, lora=spec).apply)(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    base = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(folders[name]).eval(),
                     ids, mask)

    real = mask.astype(bool)
    assert np.abs(reference - base)[real].max() > 1e-2, "the experts should move the logits"
    assert np.abs(with_adapter - reference)[real].max() <= TORCH_TOL
    assert np.abs(with_adapter - ours)[real].max() <= FLAX_TOL


def test_folded_experts_form_one_adapter_with_scaling_one(folders, tmp_path):
    config, params = trained(folders["qwen2"], TWO)
    save_peft_adapter(tmp_path, params, config, TWO, base_model_name_or_path="base")
    adapter_config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["use_rslora"]) == (
        8, 8.0, False)
    assert adapter_config["base_model_name_or_path"] == "base"

    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    q = params["layers"]["1"]["self_attn"]["q_proj"]
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    s1, s2 = TWO.scales
    np.testing.assert_array_equal(a, np.concatenate([q["lora_1"]["a"], q["lora_2"]["a"]], 1).T)
    np.testing.assert_allclose(b, np.concatenate([s1 * q["lora_1"]["b"], s2 * q["lora_2"]["b"]],
                                                 0).T, rtol=1e-7)

    module = peft_model(folders["qwen2"], tmp_path).base_model.model.model.layers[1].self_attn
    assert module.q_proj.scaling["default"] == 1.0


def test_tensor_names_and_shapes_are_what_peft_itself_saves(folders, tmp_path):
    config, params = trained(folders["gemma3"], TWO)
    save_peft_adapter(tmp_path, params, config, TWO, base_model_name_or_path=None)
    ours = {k: v.shape for k, v in load_file(tmp_path / ADAPTER_WEIGHTS).items()}
    saved = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert saved["target_modules"] == sorted(TWO.targets)

    base = transformers.AutoModelForCausalLM.from_pretrained(folders["gemma3"])
    reference = peft.get_peft_model(base, peft.LoraConfig(
        r=saved["r"], lora_alpha=saved["lora_alpha"], target_modules=saved["target_modules"],
        task_type="CAUSAL_LM"))
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
    assert ours == theirs


def test_targets_on_some_layers_only_are_listed_by_full_name(folders, tmp_path):
    spec = LoraSpec(experts=(LoraExpert(2, 4), LoraExpert(3, 6)), dropout=0.0,
                    targets=("layers/0/self_attn/q_proj", "layers/2/mlp/down_proj"))
    config, params = trained(folders["qwen2"], spec)
    save_peft_adapter(tmp_path / "adapter", params, config, spec, base_model_name_or_path=None)
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert saved["target_modules"] == ["model.layers.0.self_attn.q_proj",
                                       "model.layers.2.mlp.down_proj"]

    model = peft_model(folders["qwen2"], tmp_path / "adapter")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert wrapped == ["base_model.model.model.layers.0.self_attn.q_proj",
                       "base_model.model.model.layers.2.mlp.down_proj"]
    ids, mask = padded_batch(length=8)
    merged = save_hf(tmp_path / "merged", params, config, lora=spec)
    reference = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(merged).eval(),
                          ids, mask)
    assert np.abs(hf_logits(model, ids, mask) - reference)[mask.astype(bool)].max() <= TORCH_TOL


def test_scanned_tree_writes_the_same_adapter(folders, tmp_path):
    config, params = trained(folders["gemma3"], TWO)
    layers = params["layers"]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[layers[str(i)] for i in range(config.num_layers)])
    scanned = {**params, "layers": stacked}
    save_peft_adapter(tmp_path / "flat", params, config, TWO, base_model_name_or_path="m")
    save_peft_adapter(tmp_path / "scan", scanned, config, TWO, base_model_name_or_path="m")

    flat = load_file(tmp_path / "flat" / ADAPTER_WEIGHTS)
    scan = load_file(tmp_path / "scan" / ADAPTER_WEIGHTS)
    assert sorted(flat) == sorted(scan) and len(flat) == 2 * 7 * config.num_layers
    for name in flat:
        np.testing.assert_array_equal(flat[name], scan[name], err_msg=name)
    assert ((tmp_path / "flat" / ADAPTER_CONFIG).read_text()
            == (tmp_path / "scan" / ADAPTER_CONFIG).read_text())


def test_bfloat16_storage(folders, tmp_path):
    config, params = trained(folders["qwen2"], ONE)
    save_peft_adapter(tmp_path, params, config, ONE, base_model_name_or_path="m",
                      dtype=jnp.bfloat16)
    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {np.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("changed", ["layers/1/mlp/up_proj/kernel",
                                     "layers/0/self_attn/k_proj/bias", "norm/scale"])
def test_a_trained_base_leaf_is_refused(folders, tmp_path, changed):
    config, params = trained(folders["qwen2"], ONE)
    base = strip_lora(params)
    *parents, leaf = changed.split("/")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = node[leaf] + 1e-3
    with pytest.raises(ValueError, match=changed):
        save_peft_adapter(tmp_path, params, config, ONE, base_model_name_or_path="m",
                          base_params=base)
    assert not (tmp_path / ADAPTER_WEIGHTS).exists()


def test_params_without_experts_or_with_other_ranks_are_refused(folders, tmp_path):
    config, base = load_hf(folders["qwen2"])
    with pytest.raises(ValueError, match="no lora_"):
        save_peft_adapter(tmp_path, base, config, ONE, base_model_name_or_path="m")
    _, params = trained(folders["qwen2"], ONE)
    with pytest.raises(ValueError, match="rank 5"):
        save_peft_adapter(tmp_path, params, config, LoraSpec(experts=(LoraExpert(5, 5),)),
                          base_model_name_or_path="m")
    with pytest.raises(ValueError, match=r"LoraSpec describes 2"):
        save_peft_adapter(tmp_path, params, config, TWO, base_model_name_or_path="m")


def run_artifacts(folder, mode, spec, **config):
    """A finished run as ``load_run`` returns it (here built directly from params)."""
    model_config, params = trained(folder, spec)
    train_config = TrainConfig(mode=mode, model=str(folder),
                               lora_ranks=tuple(e.rank for e in spec.experts), **config)
    return types.SimpleNamespace(config=train_config, model_config=model_config, params=params,
                                 lora=spec, roles=mode_roles(train_config, params), mode=mode,
                                 source_dir=folder, tokenizer=None)


def test_export_writes_merged_and_adapter_for_molfe(folders, tmp_path):
    run = run_artifacts(folders["qwen2"], "molfe", TWO)
    written, note = export_artifacts(run, tmp_path, dtype="float32")
    assert note is None and set(written) == {"merged", "adapter"}
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert (saved["r"], saved["base_model_name_or_path"]) == (8, str(folders["qwen2"]))


@pytest.mark.parametrize("mode,extra,reason", [
    ("molf", {}, "molf trains the base kernels"),
    ("molfe", {"train_embeddings_norms": True}, "non-LoRA parameters"),
])
def test_export_refuses_an_adapter_for_a_run_that_trained_its_base(folders, tmp_path, mode,
                                                                    extra, reason):
    run = run_artifacts(folders["qwen2"], mode, ONE if mode == "molf" else TWO, **extra)
    with pytest.raises(ValueError, match=reason):
        export_artifacts(run, tmp_path, adapter_dir=tmp_path / "adapter")
    written, note = export_artifacts(run, tmp_path)
    assert set(written) == {"merged"} and reason in note
    assert not (tmp_path / "adapter").exists()


def test_export_dtype_bfloat16_writes_bfloat16_that_keeps_large_values(folders, tmp_path):
    """bfloat16, not float16: Gemma's scaled embeddings reach values float16 cannot hold."""
    run = run_artifacts(folders["gemma3"], "molfe", TWO)
    large = 1e5  # past float16's largest finite value, 65504
    run.params = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0, 0].set(large) if "embed_tokens" in jax.tree_util.keystr(path)
        else x, run.params)
    written, note = export_artifacts(run, tmp_path, dtype="bfloat16")
    assert note is None
    merged = load_file(written["merged"] / "model.safetensors")
    adapter = load_file(written["adapter"] / ADAPTER_WEIGHTS)
    assert {t.dtype for t in [*merged.values(), *adapter.values()]} == {np.dtype(jnp.bfloat16)}
    embedding = merged["model.embed_tokens.weight"].astype(np.float32)
    assert embedding[0, 0] == np.float32(jnp.bfloat16(large)) and np.isfinite(embedding).all()
