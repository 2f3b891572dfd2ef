"""Broken HF folders fail loudly, naming the file and the tensor at fault."""

import json
import re
import shutil

import pytest
from safetensors.numpy import load_file, save_file
from tiny_hf import VOCAB, qwen2_config, random_model, save
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from molf_jax.checkpoints import load_hf
from molf_jax.checkpoints.hf import INDEX_FILE


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory):
    folder = save(random_model(qwen2_config(num_hidden_layers=2)),
                  tmp_path_factory.mktemp("errors") / "qwen2", max_shard_size=40_000)
    assert len(weight_map(folder)) and len(set(weight_map(folder).values())) > 2
    return folder


@pytest.fixture
def folder(sharded_folder, tmp_path):
    return shutil.copytree(sharded_folder, tmp_path / "copy")


def weight_map(folder):
    return json.loads((folder / INDEX_FILE).read_text())["weight_map"]


def rewrite_shard(folder, tensor, change):
    """Applies ``change(tensors_dict)`` to the shard holding ``tensor``; returns its file name."""
    file = weight_map(folder)[tensor]
    tensors = load_file(folder / file)
    change(tensors)
    save_file(tensors, folder / file, metadata={"format": "pt"})
    return file


def write_tokenizer(folder, size, special=()):
    tokenizer = Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(special))
    tokenizer.save(str(folder / "tokenizer.json"))


def test_unsupported_architecture_names_the_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: unsupported architecture "
                                         r"\['LlamaForCausalLM'\]"):
        load_hf(folder)


def test_missing_shard_names_the_file_and_a_tensor(folder):
    file = sorted(set(weight_map(folder).values()))[-1]
    held = [name for name, f in weight_map(folder).items() if f == file]
    (folder / file).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(file)}: shard missing") as err:
        load_hf(folder)
    assert str(err.value).rsplit("tensor ", 1)[1].rstrip(")") in held


def test_truncated_shard_names_the_file(folder):
    file = sorted(set(weight_map(folder).values()))[1]
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(file)}: .*truncated"):
        load_hf(folder)


def test_tensor_of_wrong_shape_names_file_tensor_and_shapes(folder):
    tensor = "model.layers.1.mlp.up_proj.weight"  # [96, 64] in the checkpoint

    def shrink(tensors):
        tensors[tensor] = tensors[tensor][:90]
    file = rewrite_shard(folder, tensor, shrink)
    with pytest.raises(ValueError, match=rf"{re.escape(file)}: tensor {re.escape(tensor)} has "
                                         r"shape \(90, 64\), expected \(96, 64\)"):
        load_hf(folder)


def test_missing_tensor_is_named(folder):
    tensor = "model.layers.1.input_layernorm.weight"
    rewrite_shard(folder, tensor, lambda tensors: tensors.pop(tensor))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(tensor)} is listed in the index "
                                         "but absent"):
        load_hf(folder)
    index = json.loads((folder / INDEX_FILE).read_text())
    del index["weight_map"][tensor]
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(tensor)} .*is missing"):
        load_hf(folder)


def test_unexpected_tensor_is_named(folder):
    tensor = "model.layers.0.self_attn.o_proj.bias"  # Qwen2 has no o_proj bias
    anchor = "model.layers.0.self_attn.q_proj.bias"

    def add(tensors):
        tensors[tensor] = tensors[anchor][:64]
    file = rewrite_shard(folder, anchor, add)
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"][tensor] = file
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{re.escape(file)}: unexpected tensor "
                                         rf"{re.escape(tensor)}"):
        load_hf(folder)


def test_tokenizer_larger_than_the_vocabulary_is_refused(folder):
    write_tokenizer(folder, VOCAB + 8)
    with pytest.raises(ValueError, match=rf"tokenizer\.json: tokenizer vocabulary reaches id "
                                         rf"{VOCAB + 7} .*vocab_size={VOCAB}"):
        load_hf(folder)


def test_special_token_past_the_vocabulary_only_warns(folder):
    # Like Gemma 3's image placeholder: a special id one past the embedding table.
    write_tokenizer(folder, VOCAB, special=["<image_soft_token>"])
    with pytest.warns(UserWarning, match=rf"special tokens \[{VOCAB}\]"):
        config, params = load_hf(folder)
    assert params["embed_tokens"]["embedding"].shape == (VOCAB, config.hidden_size)


def test_pickle_checkpoints_are_not_read(folder):
    for file in set(weight_map(folder).values()):
        (folder / file).unlink()
    (folder / INDEX_FILE).unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not read"):
        load_hf(folder)
