"""Hugging Face folders in and out: safetensors (single file or sharded index) <-> Flax params.

Loading builds the model abstractly, then creates every parameter with
``jax.make_array_from_callback`` on its target sharding: each device's callback reads only its
slice of the tensor through ``safe_open(...).get_slice``, so no host ever holds a full copy of the
model (one tensor slice at a time). Only safetensors are read: no pickle, no remote code.

Saving writes the merged model (LoRA experts folded in) as safetensors plus ``config.json`` and
the tokenizer files, which ``transformers`` loads unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from molf_jax.adalora import AdaLoraSpec, adalora_triplets, merge_adalora
from molf_jax.checkpoints.folders import check_destination, written_whole
from molf_jax.lora import LoraSpec, lora_paths, merge_lora
from molf_jax.models import DecoderConfig, abstract_params, build_model, family_of, load_config
from molf_jax.trees import path_to_str

__all__ = ["check_tokenizer_vocab", "load_hf", "load_hf_params", "save_hf"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Multimodal checkpoints keep the text tower under these prefixes (5.x, then 4.x spelling).
_PREFIX_ALIASES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                   ("language_model.lm_head.", "lm_head."))
# Tensors that are not part of the text decoder and are skipped on purpose.
_IGNORED = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.|rotary_emb\.inv_freq$")

Sharding = jax.sharding.Sharding
ShardingSpec = Sharding | Callable[[str, tuple[int, ...]], Sharding] | Mapping | None


# --------------------------------------------------------------------------------- reading ---

class _TensorSource:
    """Where every HF tensor of a folder lives, with open safetensors handles."""

    def __init__(self, hf_dir: Path, stack: contextlib.ExitStack):
        self.hf_dir = hf_dir
        self._stack = stack
        self._handles: dict[str, Any] = {}
        index_path = hf_dir / INDEX_FILE
        if index_path.is_file():
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' in the index")
            self.files = dict(weight_map)
            for name, file in sorted(self.files.items()):
                # Shards live in the folder itself (a hub cache's links to its blobs are fine,
                # a name that climbs out of the folder is not).
                if not isinstance(file, str) or not file or Path(file).is_absolute() or \
                        ".." in Path(file).parts:
                    raise ValueError(f"{index_path}: tensor {name} is mapped to {file!r}; a "
                                     "shard must be a file inside the folder")
                if not (hf_dir / file).is_file():
                    raise FileNotFoundError(f"{hf_dir / file}: shard missing (listed in "
                                            f"{INDEX_FILE} for tensor {name})")
        elif (hf_dir / SINGLE_FILE).is_file():
            self.files = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
        else:
            found = sorted(p.name for p in hf_dir.glob("*.bin")) if hf_dir.is_dir() else []
            hint = f" (found {found}: pickle checkpoints are not read)" if found else ""
            raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.names: dict[str, str] = {}
        for raw in self.files:
            name = _canonical(raw)
            if name is not None:
                self.names[name] = raw

    def _open(self, file: str):
        if file not in self._handles:
            path = self.hf_dir / file
            try:
                self._handles[file] = self._stack.enter_context(safe_open(path, framework="np"))
            except SafetensorError as err:
                raise ValueError(f"{path}: not a readable safetensors file, truncated or "
                                 f"corrupt ({err})") from None
        return self._handles[file]

    def where(self, name: str) -> Path:
        return self.hf_dir / self.files[self.names[name]]

    def slice(self, name: str):
        raw = self.names[name]
        handle = self._open(self.files[raw])
        try:
            return handle.get_slice(raw)
        except SafetensorError:
            raise ValueError(f"{self.where(name)}: tensor {raw} is listed in the index but "
                             "absent from the file") from None


def _canonical(name: str) -> str | None:
    for prefix, replacement in _PREFIX_ALIASES:
        if name.startswith(prefix):
            name = replacement + name[len(prefix):]
            break
    return None if _IGNORED.search(name) else name


def _plan(config: DecoderConfig, scanned: bool) -> dict[str, tuple[list[str], bool]]:
    """Flax path -> (HF names, one per stacked layer or a single one; transpose)."""
    plan = {}
    for hf_name, flax_path, transpose in family_of(config).param_table:
        if "{i}" not in flax_path:
            plan[flax_path] = ([hf_name], transpose)
        elif scanned:
            plan[flax_path.replace("{i}/", "")] = (
                [hf_name.format(i=i) for i in range(config.num_layers)], transpose)
        else:
            for i in range(config.num_layers):
                plan[flax_path.format(i=i)] = ([hf_name.format(i=i)], transpose)
    return plan


def _resolve_sharding(shardings: ShardingSpec, path: str, shape: tuple[int, ...],
                      flat: dict[str, Sharding] | None) -> Sharding:
    if shardings is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, Sharding):
        return shardings
    if flat is not None:
        if path not in flat:
            raise KeyError(f"shardings tree has no entry for parameter {path}")
        return flat[path]
    return shardings(path, shape)


def load_hf_params(hf_dir: str | os.PathLike, config: DecoderConfig, *,
                   param_dtype: Any = jnp.float32, scan_layers: bool = False,
                   shardings: ShardingSpec = None) -> dict:
    """Reads the safetensors of an HF folder into a Flax parameter tree.

    Args:
      hf_dir: folder with ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
      config: the model's config (``load_config(hf_dir)``).
      param_dtype: dtype of the returned leaves (converted while reading each slice).
      scan_layers: return the stacked layout of ``build_model(..., scan_layers=True)``.
      shardings: where each leaf goes: None (first local device), one ``Sharding`` for all, a
        tree of shardings shaped like the params, or ``fn(path, shape) -> Sharding`` with paths
        like ``"layers/0/mlp/up_proj/kernel"``. Each device reads only its own slice.

    Returns:
      The parameter tree (no LoRA leaves; add them with ``molf_jax.lora.add_lora_experts``).

    Raises:
      FileNotFoundError: no safetensors, or a shard named by the index is missing.
      ValueError: a truncated/corrupt file, a tensor missing, unexpected or of the wrong shape
        (the message names the file and the tensor).

    Example:
      >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",))   # doctest: +SKIP
      >>> spec = lambda path, shape: NamedSharding(mesh, P("fsdp") if len(shape) > 1 else P())
      >>> params = load_hf_params("Qwen2.5-1.5B", load_config("Qwen2.5-1.5B"),
      ...                         shardings=spec)                        # doctest: +SKIP
    """
    hf_dir = Path(hf_dir)
    model = build_model(config, scan_layers=scan_layers, param_dtype=param_dtype)
    expected = {path_to_str(p): leaf for p, leaf in
                jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]}
    plan = _plan(config, scan_layers)
    flat_shardings = None
    if isinstance(shardings, Mapping):
        flat_shardings = {path_to_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
            shardings, is_leaf=lambda x: isinstance(x, Sharding))[0]}

    with contextlib.ExitStack() as stack:
        source = _TensorSource(hf_dir, stack)
        used = set()
        arrays = {}
        for path, leaf in expected.items():
            if path not in plan:
                raise ValueError(f"internal: no HF tensor maps to parameter {path}")
            names, transpose = plan[path]
            per_layer = leaf.shape[1:] if scan_layers and path.startswith("layers/") else leaf.shape
            want = tuple(reversed(per_layer)) if transpose else tuple(per_layer)
            for name in names:
                if name not in source.names:
                    raise ValueError(f"{hf_dir}: tensor {name} (for {path}) is missing from the "
                                     "checkpoint")
                got = tuple(source.slice(name).get_shape())
                if got != want:
                    raise ValueError(f"{source.where(name)}: tensor {name} has shape {got}, "
                                     f"expected {want} for {path} under config.json")
                used.add(name)
            stacked = scan_layers and path.startswith("layers/")
            sharding = _resolve_sharding(shardings, path, leaf.shape, flat_shardings)
            arrays[path] = jax.make_array_from_callback(
                leaf.shape, sharding,
                _reader(source, names, transpose, stacked, np.dtype(leaf.dtype)))
        # A tied checkpoint may still carry lm_head.weight; it is the embedding and is skipped.
        unexpected = sorted(set(source.names) - used - {"lm_head.weight"})
        if unexpected:
            first = unexpected[0]
            raise ValueError(f"{source.where(first)}: unexpected tensor {first} "
                             f"({len(unexpected)} unmapped in all) for {type(config).__name__}")
    return _unflatten(arrays)


def _reader(source: _TensorSource, names: list[str], transpose: bool, stacked: bool,
            dtype: np.dtype) -> Callable:
    def read_one(name: str, index: tuple) -> np.ndarray:
        if transpose:
            return np.asarray(source.slice(name)[index[1], index[0]]).T
        return np.asarray(source.slice(name)[index] if index else source.slice(name)[:])

    def callback(index: tuple) -> np.ndarray:
        if stacked:
            layers = range(len(names))[index[0]]
            data = np.stack([read_one(names[i], index[1:]) for i in layers])
        else:
            data = read_one(names[0], index)
        return np.ascontiguousarray(data.astype(dtype, copy=False))

    return callback


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


_TOKENIZER_VOCABS = ("tokenizer.json", "tokenizer.model", "vocab.json")
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_tokenizer_files(hf_dir: str | os.PathLike) -> None:
    """Raises ValueError naming the file when a folder's tokenizer cannot load as it is: no
    vocabulary file at all, or a JSON file that is not a JSON object (transformers says
    neither which file nor what is wrong).

    Example:
      >>> check_tokenizer_files("runs/molf/merged")            # doctest: +SKIP
    """
    folder = Path(hf_dir)
    if not any((folder / name).is_file() for name in _TOKENIZER_VOCABS):
        raise ValueError(f"{folder}: no tokenizer ({', '.join(_TOKENIZER_VOCABS)}); copy the "
                         "base model's tokenizer files into the folder")
    for name in _TOKENIZER_JSON:
        if (folder / name).is_file():
            _json_object(folder / name)


def _json_object(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a JSON object")
    return content


def check_tokenizer_vocab(hf_dir: str | os.PathLike, vocab_size: int) -> None:
    """Raises if the folder's tokenizer can produce ids outside the model's embedding table.

    Ids of the base vocabulary and of non-special added tokens must be ``< vocab_size``.
    Special added tokens past the table (Gemma 3 lists its image placeholder 262144 beside a
    262144-row text model) only warn: they never come out of plain text. Checks
    ``tokenizer.json``; a folder without one is left unchecked.

    Example:
      >>> check_tokenizer_vocab("Qwen2.5-1.5B", 151936)   # doctest: +SKIP
    """
    path = Path(hf_dir) / "tokenizer.json"
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    _json_object(path)  # tokenizers' own error names neither the file nor the fault
    tokenizer = Tokenizer.from_file(str(path))
    base_ids = list(tokenizer.get_vocab(with_added_tokens=False).values())
    added = tokenizer.get_added_tokens_decoder()
    plain_ids = base_ids + [i for i, tok in added.items() if not tok.special]
    top = max(plain_ids, default=-1)
    if top >= vocab_size:
        raise ValueError(f"{path}: tokenizer vocabulary reaches id {top} ({len(base_ids)} base "
                         f"tokens, {len(added)} added) but config.json has vocab_size="
                         f"{vocab_size}; the tokenizer does not match the model")
    beyond = sorted(i for i, tok in added.items() if tok.special and i >= vocab_size)
    if beyond:
        warnings.warn(f"{path}: special tokens {beyond[:5]} lie past vocab_size={vocab_size}; "
                      "they cannot be fed to the model", stacklevel=2)


def load_hf(hf_dir: str | os.PathLike, *, param_dtype: Any = jnp.float32,
            scan_layers: bool = False, shardings: ShardingSpec = None,
            check_tokenizer: bool = True) -> tuple[DecoderConfig, dict]:
    """``load_config`` + tokenizer check + ``load_hf_params`` for one HF folder.

    Example:
      >>> config, params = load_hf("gemma-3-1b-pt", param_dtype=jnp.bfloat16)   # doctest: +SKIP
      >>> logits = build_model(config).apply({"params": params}, ids, mask)       # doctest: +SKIP
    """
    config = load_config(hf_dir)
    if check_tokenizer:
        check_tokenizer_vocab(hf_dir, config.vocab_size)
    return config, load_hf_params(hf_dir, config, param_dtype=param_dtype,
                                  scan_layers=scan_layers, shardings=shardings)


# --------------------------------------------------------------------------------- writing ---

def _host(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _is_scanned(params: Mapping) -> bool:
    layers = params.get("layers", {})
    return bool(layers) and not all(str(k).isdigit() for k in layers)


def _hf_tensors(params: Mapping, config: DecoderConfig, dtype: Any) -> dict[str, np.ndarray]:
    scanned = _is_scanned(params)
    flat = {path_to_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    plan = _plan(config, scanned)
    tensors = {}
    for path, leaf in flat.items():
        if path not in plan:
            raise ValueError(f"parameter {path} has no HF name in the {family_of(config).name} "
                             "table")
        names, transpose = plan[path]
        value = _host(leaf)
        if dtype is not None:
            value = value.astype(np.dtype(dtype))
        slices = list(value) if scanned and path.startswith("layers/") else [value]
        for name, part in zip(names, slices, strict=True):
            tensors[name] = np.ascontiguousarray(part.T if transpose else part)
    return tensors


def _config_json(config: DecoderConfig, source_dir: Path | None, dtype_name: str) -> dict:
    hf = None
    if source_dir is not None and (source_dir / "config.json").is_file():
        with open(source_dir / "config.json", encoding="utf-8") as f:
            hf = json.load(f)
        # A multimodal source (text tower only is exported) gets a generated text config.
        if hf.get("model_type") != config.model_type:
            hf = None
    if hf is None:
        hf = config.to_hf()
    hf["architectures"] = [config.architecture]
    hf["tie_word_embeddings"] = config.tie_word_embeddings
    hf["dtype"] = dtype_name
    if "torch_dtype" in hf:
        hf["torch_dtype"] = dtype_name
    return hf


def save_hf(out_dir: str | os.PathLike, params: Mapping, config: DecoderConfig, *,
            lora: LoraSpec | None = None, source_dir: str | os.PathLike | None = None,
            tokenizer: Any = None, dtype: Any = None,
            max_shard_size: int | None = None, overwrite: bool = False,
            protected: tuple = ()) -> Path:
    """Writes an HF folder (merged weights, ``config.json``, tokenizer) for ``transformers``.

    Args:
      out_dir: destination folder (created).
      params: scanned or unscanned tree; LoRA leaves are merged with ``lora``.
      config: the model's config.
      lora: the spec of the LoRA leaves in ``params`` (required if there are any), or the
        ``AdaLoraSpec`` of its AdaLoRA triplets (folded in as ``s (a * e) @ b``).
      source_dir: HF folder the model came from: its ``config.json`` (same model type) and
        tokenizer / generation files are carried over.
      tokenizer: an HF tokenizer to ``save_pretrained`` into the folder instead.
      dtype: storage dtype (e.g. ``jnp.bfloat16``); default each leaf's own.
      max_shard_size: bytes per shard; larger models get ``model-0000k-of-0000n.safetensors``
        files and an index.
      overwrite: replace a folder holding files molf_jax did not write. The folder is written
        beside ``out_dir`` and renamed into place (`molf_jax.checkpoints.folders`); the
        ``source_dir``, the ``protected`` folders, the embedded model's cache and run
        directories are never written over.

    Returns:
      The folder path.

    Example:
      >>> save_hf("export", params, config, lora=spec, source_dir="Qwen2.5-1.5B")   # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    protected = (source_dir, *protected)
    check_destination(out_dir, overwrite=overwrite, protected=protected)
    if isinstance(lora, AdaLoraSpec):
        params = merge_adalora(params, lora)
    elif next(adalora_triplets(params), None) is not None:
        raise ValueError("params hold AdaLoRA triplets; pass lora=<AdaLoraSpec> to merge them")
    if lora_paths(params):
        if lora is None:
            raise ValueError("params hold LoRA leaves; pass lora=<LoraSpec> to merge them "
                             "(or drop them with molf_jax.lora.strip_lora)")
        params = merge_lora(params, lora)
    tensors = _hf_tensors(params, config, dtype)
    if jax.process_index() != 0:
        return out_dir
    dtype_name = str(next(iter(tensors.values())).dtype)
    source = Path(source_dir) if source_dir is not None else None
    with written_whole(out_dir, overwrite=overwrite, protected=protected,
                       record={"kind": "hf", "dtype": dtype_name}) as folder:
        _write_tensors(folder, tensors, max_shard_size)
        with open(folder / "config.json", "w", encoding="utf-8") as f:
            json.dump(_config_json(config, source, dtype_name), f, indent=2)
        if source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, folder / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return out_dir


def _write_tensors(out_dir: Path, tensors: dict[str, np.ndarray],
                   max_shard_size: int | None) -> None:
    metadata = {"format": "pt"}
    total = sum(t.nbytes for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(tensors, out_dir / SINGLE_FILE, metadata=metadata)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / file, metadata=metadata)
        weight_map.update({name: file for name in shard})
    with open(out_dir / INDEX_FILE, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
