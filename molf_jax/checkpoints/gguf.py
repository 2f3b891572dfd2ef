"""Convert a GGUF checkpoint into a Hugging Face folder, with numpy through the `gguf` package.

The folder holds `config.json`, `model.safetensors` (Hugging Face tensor names) and the tokenizer
files, so that `AutoModelForCausalLM.from_pretrained(folder)`, `AutoTokenizer.from_pretrained(folder)`
and our own loader read it like any checkpoint. Tensors are dequantised and written one row-chunk
at a time, so memory stays near one chunk whatever the model size.

Two things llama.cpp changes when it writes a GGUF are undone here:
  * Gemma stores RMSNorm weights as `w` and computes `x * (1 + w)`; llama.cpp writes `w + 1`
    (every `*norm.weight`, the q/k norms included), so we subtract 1.
  * Llama-family q/k rows are permuted for llama.cpp's rotary layout. Gemma 3 and Qwen2 are written
    without that permutation (transformers' GGUF loader applies none for them either), so there is
    nothing to undo for the families supported here.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from molf_jax.checkpoints._gguf_tokenizer import save_gguf_tokenizer

SUPPORTED_ARCHITECTURES = ("gemma3", "qwen2")
SUPPORTED_DTYPES = ("float32", "bfloat16")

# Elements dequantised per step: bounds peak memory (about 4 bytes times this, plus temporaries).
_CHUNK_ELEMENTS = 1 << 24

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_SHARED_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class _Family:
    """What differs between the supported architectures."""

    hf_architecture: str
    layer_names: dict[str, str]  # GGUF leaf name -> HF module path inside `model.layers.N`
    layer_tensors: frozenset[str]  # every `leaf.weight` / `leaf.bias` a layer must hold
    norm_offset: float  # subtracted from every `*norm.weight`


_FAMILIES = {
    "gemma3": _Family(
        hf_architecture="Gemma3ForCausalLM",
        layer_names={
            **_SHARED_LAYER_NAMES,
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        layer_tensors=frozenset(
            f"{leaf}.weight"
            for leaf in [*_SHARED_LAYER_NAMES, "attn_q_norm", "attn_k_norm", "post_attention_norm",
                         "ffn_norm", "post_ffw_norm"]
        ),
        norm_offset=1.0,
    ),
    "qwen2": _Family(
        hf_architecture="Qwen2ForCausalLM",
        # Qwen2 has no pre-feed-forward norm: GGUF's `ffn_norm` is HF's `post_attention_layernorm`.
        layer_names={**_SHARED_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},
        layer_tensors=frozenset(
            [f"{leaf}.weight" for leaf in [*_SHARED_LAYER_NAMES, "ffn_norm"]]
            + ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
        ),
        norm_offset=0.0,
    ),
}


@dataclass(frozen=True)
class _PlannedTensor:
    """One GGUF tensor and where it goes."""

    source: Any  # gguf.ReaderTensor
    hf_name: str
    hf_shape: tuple[int, ...]
    is_norm: bool


_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_TENSOR = re.compile(r"^(\w+)\.(weight|bias)$")


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Dequantises a GGUF checkpoint and writes it as a Hugging Face model folder.

    Supports the `gemma3` (text) and `qwen2` GGUF architectures. Writes `config.json`,
    `model.safetensors` and the tokenizer files into `out_dir` (created if missing).

    The tokenizer is built from the GGUF metadata with the `tokenizers` library
    (`molf_jax.checkpoints._gguf_tokenizer`) and the weights go through numpy: no torch.

    Args:
      gguf_path: the `.gguf` file.
      out_dir: folder to write into.
      dtype: `'float32'` (exact dequantised values) or `'bfloat16'`.

    Returns:
      `out_dir` as a `Path`.

    Raises:
      FileNotFoundError: `gguf_path` does not exist.
      ValueError: unsupported architecture or dtype, or a tensor name or shape the architecture
        does not have.

    Example:
      >>> folder = convert_gguf_to_hf("gemma-3-270m-q4_k_m.gguf", "/tmp/gemma3-270m")  # doctest: +SKIP
      >>> model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # doctest: +SKIP
    """
    import gguf  # imported on use: only conversion needs it

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")

    _status(f"Reading {gguf_path.name} (a large vocabulary takes a few seconds)")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as err:  # bad magic, truncated file, ...
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({err})") from err
    arch = _metadata(reader, "general.architecture")
    if arch not in _FAMILIES:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = _FAMILIES[arch]
    num_layers = int(_metadata(reader, f"{arch}.block_count"))
    plan = _plan_tensors(reader, family, num_layers, gguf_path)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _build_config(reader, arch, family, plan, gguf_path, dtype)
    _write_safetensors(out_dir / "model.safetensors", plan, family, dtype, gguf_path)
    config.save_pretrained(out_dir)
    _status(f"Writing the tokenizer of {gguf_path.name}")
    tokenizer = _save_tokenizer(reader, gguf_path, out_dir, config.model_type)
    check_tokenizer(tokenizer, _vocab_head(reader, 20_000),
                    add_bos=bool(_metadata(reader, "tokenizer.ggml.add_bos_token", False)),
                    source=gguf_path)
    return out_dir


def _status(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _metadata(reader, key: str, default: Any = ...) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{reader.data.filename}: GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _plan_tensors(reader, family: _Family, num_layers: int, gguf_path: Path) -> list[_PlannedTensor]:
    """Maps every GGUF tensor to its HF name and shape; checks nothing is unknown or missing."""
    plan = []
    per_layer: dict[int, set[str]] = {i: set() for i in range(num_layers)}
    top_level = set()
    for tensor in reader.tensors:
        hf_name, layer, leaf = _hf_name(tensor.name, family, num_layers, gguf_path)
        if layer is None:
            top_level.add(leaf)
        else:
            per_layer[layer].add(leaf)
        # GGUF lists dimensions fastest-first; numpy (and HF's [out, in]) is the reverse.
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        plan.append(_PlannedTensor(tensor, hf_name, shape, hf_name.endswith("norm.weight")))

    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in top_level:
            raise ValueError(f"{gguf_path}: missing tensor {required!r}")
    for layer, leaves in per_layer.items():
        missing = sorted(family.layer_tensors - leaves)
        if missing:
            raise ValueError(f"{gguf_path}: layer {layer} is missing tensors "
                             + ", ".join(f"blk.{layer}.{m}" for m in missing))
    return plan


def _hf_name(name: str, family: _Family, num_layers: int, gguf_path: Path):
    """Returns `(hf_name, layer index or None, gguf leaf)` or raises for a name we cannot place."""
    match = _LAYER_TENSOR.match(name)
    if match:
        layer, leaf, kind = int(match[1]), match[2], match[3]
        if layer < num_layers and leaf in family.layer_names and f"{leaf}.{kind}" in family.layer_tensors:
            return f"model.layers.{layer}.{family.layer_names[leaf]}.{kind}", layer, f"{leaf}.{kind}"
    else:
        match = _TOP_TENSOR.match(name)
        if match and match[1] in _TOP_LEVEL_NAMES and match[2] == "weight":
            return f"{_TOP_LEVEL_NAMES[match[1]]}.weight", None, name
    raise ValueError(
        f"{gguf_path}: unknown tensor {name!r} for architecture "
        f"{family.hf_architecture} ({num_layers} layers); cannot map it to a Hugging Face name"
    )


def _write_safetensors(path: Path, plan: list[_PlannedTensor], family: _Family, dtype: str,
                       gguf_path: Path) -> None:
    """Streams the dequantised tensors into one safetensors file (format: 8-byte header length,
    JSON header, raw little-endian data), so the whole model is never held in memory."""
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    np_dtype, st_dtype = _storage_dtype(dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in plan:
        nbytes = int(np.prod(item.hf_shape)) * np_dtype.itemsize
        header[item.hf_name] = {"dtype": st_dtype, "shape": list(item.hf_shape),
                                "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        progress = tqdm(plan, desc=f"Dequantising {gguf_path.name}", unit="tensor")
        for item in progress:
            raw = item.source.data
            rows = raw.shape[0] if raw.ndim > 1 else 1
            row_elements = max(1, int(np.prod(item.hf_shape)) // rows)
            step = max(1, _CHUNK_ELEMENTS // row_elements)
            written = 0
            for start in range(0, rows, step):
                chunk = raw[start:start + step] if raw.ndim > 1 else raw
                values = np.asarray(dequantize(chunk, item.source.tensor_type), dtype=np.float32)
                if item.is_norm and family.norm_offset:
                    values = values - np.float32(family.norm_offset)
                data = np.ascontiguousarray(values.astype(np_dtype))
                f.write(data.reshape(-1).view(np.uint8))
                written += data.size
            if written != int(np.prod(item.hf_shape)):
                raise ValueError(f"{gguf_path}: tensor {item.source.name!r} dequantised to {written} "
                                 f"values, expected shape {item.hf_shape}")


def _storage_dtype(dtype: str) -> tuple[np.dtype, str]:
    if dtype == "bfloat16":
        import ml_dtypes  # ships with jax; numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16), "BF16"
    return np.dtype("<f4"), "F32"


def _build_config(reader, arch: str, family: _Family, plan: list[_PlannedTensor], gguf_path: Path,
                  dtype: str):
    """The transformers config, from GGUF metadata plus the defaults llama.cpp hard-codes."""
    shapes = {item.hf_name: item.hf_shape for item in plan}
    vocab_size, hidden = shapes["model.embed_tokens.weight"]
    num_layers = int(_metadata(reader, f"{arch}.block_count"))
    num_heads = int(_metadata(reader, f"{arch}.attention.head_count"))
    common = dict(
        architectures=[family.hf_architecture],
        vocab_size=int(vocab_size),
        hidden_size=int(_metadata(reader, f"{arch}.embedding_length")),
        intermediate_size=int(_metadata(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=int(_metadata(reader, f"{arch}.attention.head_count_kv", num_heads)),
        rms_norm_eps=_shortest_float(_metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_metadata(reader, f"{arch}.context_length")),
        tie_word_embeddings="lm_head.weight" not in shapes,
        dtype=dtype,
    )
    if common["hidden_size"] != hidden:
        raise ValueError(f"{gguf_path}: embedding_length {common['hidden_size']} does not match "
                         f"token_embd.weight of shape {shapes['model.embed_tokens.weight']}")
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        token_id = _metadata(reader, f"tokenizer.ggml.{name}_token_id", None)
        if token_id is not None:
            common[key] = int(token_id)
    rope_scaling = _rope_scaling(reader, arch)
    if rope_scaling is not None:
        common["rope_scaling"] = rope_scaling

    if arch == "gemma3":
        return _gemma3_config(reader, common)
    return _qwen2_config(reader, common, gguf_path)


def _shortest_float(value: float) -> float:
    """GGUF stores float32: 1e-6 reads back as 9.99999997e-07; write the value the file meant."""
    return float(str(np.float32(value)))


def _rope_scaling(reader, arch: str) -> dict | None:
    kind = _metadata(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"{reader.data.filename}: rope scaling {kind!r} is not supported")
    return {"rope_type": "linear", "factor": float(_metadata(reader, f"{arch}.rope.scaling.factor"))}


def _gemma3_config(reader, common: dict):
    from transformers import Gemma3TextConfig

    num_layers, hidden = common["num_hidden_layers"], common["hidden_size"]
    head_dim = int(_metadata(reader, "gemma3.attention.key_length", hidden // common["num_attention_heads"]))
    pattern = _metadata(reader, "gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer, True = sliding window
        layer_types = ["sliding_attention" if flag else "full_attention" for flag in pattern]
        pattern = layer_types.index("full_attention") + 1 if "full_attention" in layer_types else num_layers
    else:
        pattern = int(pattern)
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                       for i in range(num_layers)]
    scale = _metadata(reader, "gemma3.attention.scale", None)
    if scale is not None:
        query_pre_attn_scalar = float(scale) ** -2
    elif num_layers == 62:
        # llama.cpp: the 27B model scales queries by hidden/heads, every other size by head_dim.
        query_pre_attn_scalar = hidden // common["num_attention_heads"]
    else:
        query_pre_attn_scalar = head_dim
    optional = {
        key: float(value)
        for key in ("final_logit_softcapping", "attn_logit_softcapping")
        if (value := _metadata(reader, f"gemma3.{key}", None)) is not None
    }
    return Gemma3TextConfig(
        **common,
        **optional,
        head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar,
        rope_theta=float(_metadata(reader, "gemma3.rope.freq_base", 1_000_000.0)),
        # llama.cpp fixes Gemma 3's local rotary base at 10k unless the file says otherwise.
        rope_local_base_freq=float(_metadata(reader, "gemma3.rope.freq_base_swa", 10_000.0)),
        sliding_window=int(_metadata(reader, "gemma3.attention.sliding_window")),
        sliding_window_pattern=pattern,
        layer_types=layer_types,
        hidden_activation="gelu_pytorch_tanh",
    )


def _qwen2_config(reader, common: dict, gguf_path: Path):
    from transformers import Qwen2Config

    head_dim = common["hidden_size"] // common["num_attention_heads"]
    key_length = _metadata(reader, "qwen2.attention.key_length", head_dim)
    if int(key_length) != head_dim:
        raise ValueError(f"{gguf_path}: qwen2 head size {key_length} differs from hidden/heads "
                         f"{head_dim}, which Qwen2Config cannot express")
    return Qwen2Config(
        **common,
        rope_theta=float(_metadata(reader, "qwen2.rope.freq_base", 10_000.0)),
        use_sliding_window=False,
    )


# The GGUF metadata the tokenizer is built from (`molf_jax.checkpoints._gguf_tokenizer`).
_TOKENIZER_KEYS = tuple(f"tokenizer.ggml.{key}" for key in (
    "model", "pre", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
    "padding_token_id", "add_bos_token", "add_eos_token"))


def _save_tokenizer(reader, gguf_path: Path, out_dir: Path, model_type: str):
    """Builds the file's tokenizer with the `tokenizers` library (no torch, no transformers GGUF
    reader), writes it into ``out_dir`` and returns it as transformers loads it from there."""
    from transformers import AutoTokenizer

    fields = {key: _metadata(reader, key) for key in _TOKENIZER_KEYS
              if reader.get_field(key) is not None}
    fields["tokenizer.ggml.tokens"] = _vocab_head(reader, None)
    save_gguf_tokenizer(fields, out_dir, model_type, gguf_path)
    return AutoTokenizer.from_pretrained(out_dir)


def _vocab_head(reader, n: int | None) -> list[str]:
    """The first ``n`` vocabulary strings (None: all of them)."""
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
        return []
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data[:n]]


# Word tokens sampled from the GGUF vocabulary for `check_tokenizer`.
_WORD_PIECE = re.compile(r"^[\u2581\u0120][A-Za-z]{4,}$")  # "▁word" (SentencePiece), "Ġword" (BPE)


def check_tokenizer(tokenizer, vocab: list[str], *, add_bos: bool, source: Path,
                    sample: int = 32) -> None:
    """Raises if the tokenizer written for a GGUF, as transformers loads it back, does not
    reproduce the GGUF vocabulary.

    Two checks: a BOS token comes first when the GGUF asks for one, and whole-word tokens of
    the vocabulary (the first ``sample`` of the form ``▁word`` / ``Ġword``) encode to
    themselves. transformers 5.17's own GGUF reader failed both on Gemma 3 270M (it split
    " passport" into four pieces and dropped BOS), and a model fine-tuned through such a
    tokenizer learns nothing useful; the tokenizer built here passes with any transformers.
    """
    if add_bos and tokenizer.bos_token_id is not None:
        ids = tokenizer("a")["input_ids"]
        if not ids or ids[0] != tokenizer.bos_token_id:
            raise RuntimeError(_tokenizer_message(source, "does not start sequences with BOS, "
                                                          "which the GGUF asks for"))
    words = [t for t in vocab if _WORD_PIECE.match(t)][:sample]
    broken = []
    for token in words:
        ids = tokenizer(" " + token[1:], add_special_tokens=False)["input_ids"]
        if ids != [tokenizer.convert_tokens_to_ids(token)]:
            broken.append(f"{token!r} -> {ids}")
    if words and len(broken) > len(words) // 5:
        raise RuntimeError(_tokenizer_message(
            source, f"splits {len(broken)} of {len(words)} whole-word vocabulary tokens "
                    f"(e.g. {broken[0]})"))


def _tokenizer_message(source: Path, what: str) -> str:
    import transformers

    return (f"{source}: the tokenizer built from the GGUF's metadata, loaded by transformers "
            f"{transformers.__version__}, {what}; copy a tokenizer.json made for this model "
            "next to the converted weights")
