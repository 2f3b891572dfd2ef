"""Our Flax Qwen2 / Gemma 3 against transformers (torch, CPU) on tiny random checkpoints.

Checkpoints are built here and saved with ``save_pretrained`` (one of them sharded with an
index); float32 logits must agree within 1e-4 at every real token, for plain and scanned layers.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file
from tiny_hf import gemma3_config, hf_logits, padded_batch, qwen2_config, random_model, save

from molf_jax import models
from molf_jax.checkpoints import hf as hf_io
from molf_jax.checkpoints import load_hf, save_hf

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    built = {
        # untied head, q/k/v biases, GQA; sharded into several files plus an index
        "qwen2": (qwen2_config(), 50_000),
        # tied head and Qwen's optional sliding window on layers >= max_window_layers
        "qwen2_tied_window": (qwen2_config(tie_word_embeddings=True, use_sliding_window=True,
                                           sliding_window=4, max_window_layers=1), None),
        "gemma3": (gemma3_config(), None),
    }
    out = {}
    for name, (config, shard) in built.items():
        model = random_model(config)
        out[name] = (model, save(model, root / name, max_shard_size=shard))
    assert len(list((root / "qwen2").glob("model-*.safetensors"))) > 1
    assert (root / "qwen2" / hf_io.INDEX_FILE).is_file()
    return out


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied_window", "gemma3"])
def test_logits_match_transformers(checkpoints, name, scan):
    torch_model, folder = checkpoints[name]
    ids, mask = padded_batch(length=12)  # 12 > Gemma's window of 4
    config, params = load_hf(folder, scan_layers=scan)
    model = models.build_model(config, scan_layers=scan)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(torch_model, ids, mask)
    diff = np.abs(ours - ref)[mask.astype(bool)].max()
    assert diff <= TOL, f"{name} scan={scan}: max abs logit diff {diff:.3g}"


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_hidden_states_times_output_kernel_are_the_logits(checkpoints, name):
    _, folder = checkpoints[name]
    config, params = load_hf(folder)
    model = models.build_model(config)
    ids, mask = padded_batch(length=6)
    logits = model.apply({"params": params}, ids, mask)
    hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
    assert hidden.shape == (*ids.shape, config.hidden_size)
    np.testing.assert_allclose(hidden @ models.output_kernel(params, config), logits, atol=1e-5)


def test_scanned_tree_stacks_the_layer_trees(checkpoints):
    _, folder = checkpoints["gemma3"]
    config, plain = load_hf(folder)
    _, scanned = load_hf(folder, scan_layers=True)
    layers = [plain["layers"][str(i)] for i in range(config.num_layers)]
    expected = {**plain, "layers": jax.tree_util.tree_map(lambda *x: np.stack(x), *layers)}
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: a.shape == b.shape and bool((np.asarray(a) == np.asarray(b)).all()),
        expected, scanned))


def test_bfloat16_load_converts_every_leaf(checkpoints):
    _, folder = checkpoints["qwen2"]
    _, f32 = load_hf(folder)
    _, bf16 = load_hf(folder, param_dtype=jnp.bfloat16)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: b.dtype == jnp.bfloat16 and bool((a.astype(jnp.bfloat16) == b).all()),
        f32, bf16))


def test_sharded_load_reads_only_each_devices_slice(checkpoints, monkeypatch):
    _, folder = checkpoints["qwen2"]
    devices = np.array(jax.devices()[:4])
    assert devices.size == 4, "conftest provides 8 CPU devices"
    mesh = jax.sharding.Mesh(devices, ("fsdp",))

    def spec(path, shape):
        return NamedSharding(mesh, P("fsdp") if shape[0] % 4 == 0 and len(shape) > 1 else P())

    reads = []
    original = jax.make_array_from_callback

    def spy(shape, sharding, callback):
        def recorded(index):
            data = callback(index)
            reads.append((int(np.prod(shape)), data.size, sharding.is_fully_replicated))
            return data
        return original(shape, sharding, recorded)

    monkeypatch.setattr(hf_io.jax, "make_array_from_callback", spy)
    config, sharded = load_hf(folder, shardings=spec)
    monkeypatch.undo()
    _, reference = load_hf(folder)

    kernel = sharded["layers"]["0"]["mlp"]["up_proj"]["kernel"]  # [64, 96]
    assert kernel.sharding == spec("", kernel.shape)
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 96)}
    # every callback of a split leaf returned a quarter of the tensor, never the whole
    assert all(got * 4 == full for full, got, replicated in reads if not replicated)
    assert any(not replicated for *_, replicated in reads)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), reference, sharded))
    # the same placement given as a tree of shardings
    tree = jax.tree_util.tree_map(lambda x: spec("", x.shape), reference)
    _, from_tree = load_hf(folder, shardings=tree)
    assert from_tree["embed_tokens"]["embedding"].sharding == tree["embed_tokens"]["embedding"]


def test_save_hf_writes_back_every_tensor_unchanged(checkpoints, tmp_path):
    torch_model, original_folder = checkpoints["gemma3"]
    folder = shutil.copytree(original_folder, tmp_path / "source")
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    config, params = load_hf(folder, scan_layers=True)
    out = save_hf(tmp_path / "export", params, config, source_dir=folder, max_shard_size=60_000)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    index = json.loads((out / hf_io.INDEX_FILE).read_text())
    written = {}
    for file in set(index["weight_map"].values()):
        written.update(load_file(out / file))
    original = {k: v.numpy() for k, v in torch_model.state_dict().items()
                if k != "lm_head.weight"}  # tied to the embedding, not stored
    assert written.keys() == original.keys()
    assert all((written[k] == original[k]).all() for k in original)
    assert models.load_config(out) == config


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b", "gemma3-270m", "gemma3-1b",
                                  "gemma3-4b", "gemma3-27b"])
def test_generated_config_json_round_trips_through_transformers(name, tmp_path):
    config = models.preset(name)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.layer_types == list(config.layer_types)
    assert models.load_config(hf.to_dict()) == config


def test_load_config_picks_the_family_and_reads_hf_defaults():
    qwen = models.load_config({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
                               "num_attention_heads": 4, "num_hidden_layers": 2,
                               "rope_theta": 1e6})
    assert isinstance(qwen, models.Qwen2Config)
    assert (qwen.num_kv_heads, qwen.head_dim, qwen.rope_theta) == (4, 16, 1e6)
    assert qwen.layer_types == ("full_attention",) * 2 and qwen.sliding_window is None
    # a multimodal Gemma 3 config: the text tower, with Gemma3TextConfig defaults filled in
    gemma = models.load_config({
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024}})
    assert gemma == models.preset("gemma3-4b", eos_token_id=1)


def test_remat_and_scan_leave_gradients_unchanged(checkpoints):
    _, folder = checkpoints["qwen2"]
    config, plain = load_hf(folder)
    _, stacked = load_hf(folder, scan_layers=True)
    ids, mask = padded_batch(length=8)

    def grads(model, params):
        def loss(p):
            return jnp.mean(model.apply({"params": p}, ids, mask) ** 2)
        return jax.jit(jax.grad(loss))(params)

    reference = grads(models.build_model(config), plain)
    rematted = grads(models.build_model(config, scan_layers=True, remat="dots_saveable"), stacked)
    np.testing.assert_allclose(
        rematted["layers"]["mlp"]["down_proj"]["kernel"][1],
        reference["layers"]["1"]["mlp"]["down_proj"]["kernel"], atol=1e-6)
    np.testing.assert_allclose(rematted["embed_tokens"]["embedding"],
                               reference["embed_tokens"]["embedding"], atol=1e-6)
