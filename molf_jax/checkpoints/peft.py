"""PEFT-format LoRA adapters out: ``adapter_config.json`` + ``adapter_model.safetensors``.

The files are what ``peft.PeftModel.from_pretrained(base_model, adapter_dir)`` reads (checked
against peft 0.21): tensors named after the torch module tree of ``AutoModelForCausalLM``,

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]

and PEFT computes ``y = base(x) + scaling * (x @ A.T) @ B.T`` with ``scaling = lora_alpha / r``
(or ``lora_alpha / sqrt(r)`` with ``use_rslora``).

One expert is written as it is (its rank, alpha and rsLoRA setting), so training can resume in
PEFT with the same hyperparameters. Several experts (MoLF-E) are folded into one adapter of rank
``R = sum(r_i)``: ``A = concat_i(a_i)`` along the rank and ``B = concat_i(s_i * b_i)``, with
``lora_alpha = R`` and rsLoRA off so that PEFT's scaling is exactly 1. Then
``(x @ A) @ B = sum_i s_i (x @ a_i) @ b_i``: the same function, up to float rounding of
``s_i * b_i``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from molf_jax.checkpoints.hf import _host, _is_scanned
from molf_jax.checkpoints.folders import check_destination, written_whole
from molf_jax.lora import LoraSpec, expert_index, expert_key, lora_paths, strip_lora
from molf_jax.models import DecoderConfig, family_of
from molf_jax.trees import path_to_str

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "check_base_unchanged", "save_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel wraps the causal LM as ``base_model`` (the LoraModel) whose ``model`` is the HF model.
_PEFT_PREFIX = "base_model.model."


def save_peft_adapter(out_dir: str | os.PathLike, params: Mapping, model_config: DecoderConfig,
                      spec: LoraSpec, *, base_model_name_or_path: str | None,
                      base_params: Mapping | None = None, dtype: Any = None,
                      overwrite: bool = False, protected: tuple = ()) -> Path:
    """Writes the LoRA experts of ``params`` as one PEFT LoRA adapter.

    An adapter only carries the LoRA factors, so it reproduces the trained model only when every
    other leaf (kernels, biases, norms, embeddings) is still the base model's. ``params`` alone
    cannot tell; pass ``base_params`` (the tree the run started from, without LoRA leaves) and
    any difference is refused. Without it the caller vouches for a frozen base (``lora`` runs,
    and ``molfe`` runs without ``train_embeddings_norms``).

    Args:
      out_dir: destination folder (created).
      params: trained tree with ``lora_i/{a,b}`` leaves, unscanned or scanned (leading layer
        axis under ``layers/``).
      model_config: the model's config (gives the HF module names of the family).
      spec: the LoRA spec the leaves were made with (ranks, alphas, rsLoRA).
      base_model_name_or_path: recorded in ``adapter_config.json``; PEFT loads the base from it
        when ``AutoPeftModelForCausalLM`` is used. None writes null.
      base_params: optional base tree to check the non-LoRA leaves against (compared exactly,
        after casting the base to the trained leaf's dtype).
      dtype: storage dtype of the tensors (e.g. ``jnp.bfloat16``); default the ``a`` leaves'.
      overwrite, protected: as in `molf_jax.checkpoints.save_hf` (written beside ``out_dir``
        and renamed into place; never over a model molf_jax did not write unless overwrite).

    Returns:
      The folder path.

    Raises:
      ValueError: no LoRA leaves; experts that disagree with ``spec``; a module without an HF
        name in the family's table; a non-LoRA leaf that differs from ``base_params``.

    Example:
      >>> spec = LoraSpec(experts=(LoraExpert(16, 32), LoraExpert(128, 256)))  # doctest: +SKIP
      >>> save_peft_adapter("run/adapter", params, config, spec,          # doctest: +SKIP
      ...                   base_model_name_or_path="/models/gemma-3-1b-pt")
      >>> model = PeftModel.from_pretrained(base, "run/adapter")           # doctest: +SKIP
    """
    check_destination(out_dir, overwrite=overwrite, protected=protected)
    if not lora_paths(params):
        raise ValueError("params hold no lora_* leaves: there is no adapter to export (an fft "
                         "run? export the merged HF folder instead)")
    if base_params is not None:
        check_base_unchanged(params, base_params)
    scanned = _is_scanned(params)
    names = _module_names(model_config)
    tensors: dict[str, np.ndarray] = {}
    modules: list[str] = []
    rank = None
    for path, linear in _lora_linears(params):
        factors = _folded_factors(path, linear, spec, scanned)
        for layer, (a_t, b_t) in enumerate(factors):
            module = _hf_module(names, path, layer if scanned else None)
            out_dtype = np.dtype(dtype) if dtype is not None else a_t.dtype
            tensors[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(
                a_t.astype(out_dtype))
            tensors[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
                b_t.astype(out_dtype))
            modules.append(module)
            rank = a_t.shape[0]

    config = _adapter_config(spec, rank, modules, model_config, base_model_name_or_path)
    return _write_adapter(out_dir, tensors, config, kind="peft_adapter", overwrite=overwrite,
                          protected=protected)


def _write_adapter(out_dir, tensors: dict, config: dict, *, kind: str, overwrite: bool,
                   protected) -> Path:
    """Writes a PEFT adapter folder (weights + config) whole, from process 0 only."""
    out_dir = Path(out_dir)
    if jax.process_index() != 0:
        return out_dir
    with written_whole(out_dir, overwrite=overwrite, protected=protected,
                       record={"kind": kind}) as folder:
        save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        with open(folder / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return out_dir


def check_base_unchanged(params: Mapping, base_params: Mapping) -> None:
    """Raises if any non-LoRA leaf of ``params`` differs from ``base_params``.

    Example:
      >>> check_base_unchanged(trained, base)   # doctest: +SKIP
      ValueError: ... layers/0/self_attn/q_proj/kernel differs from the base model ...
    """
    trained = {path_to_str(p): x for p, x in
               jax.tree_util.tree_flatten_with_path(strip_lora(params))[0]}
    base = {path_to_str(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(strip_lora(base_params))[0]}
    if set(trained) != set(base):
        only_trained = sorted(set(trained) - set(base))[:3]
        only_base = sorted(set(base) - set(trained))[:3]
        raise ValueError(f"base_params does not have the layout of params (only in params: "
                         f"{only_trained or 'none'}; only in base_params: {only_base or 'none'}); "
                         "give both unscanned or both scanned")
    changed = []
    for path, leaf in trained.items():
        value = _host(leaf)
        reference = _host(base[path])
        if value.shape != reference.shape or not np.array_equal(
                value, reference.astype(value.dtype)):
            changed.append(path)
    if changed:
        listed = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5
                                           else "")
        raise ValueError(f"{listed} differ(s) from the base model: the run trained non-LoRA "
                         "parameters, which a LoRA adapter cannot carry; export the merged HF "
                         "folder instead")


def _lora_linears(params: Mapping, path: tuple[str, ...] = ()):
    """Yields (module path, linear dict) for every linear that holds ``lora_*`` leaves."""
    for key, value in params.items():
        if not isinstance(value, Mapping):
            continue
        sub = (*path, str(key))
        if any(expert_index(k) is not None for k in value):
            yield "/".join(sub), value
        else:
            yield from _lora_linears(value, sub)


def _folded_factors(path: str, linear: Mapping, spec: LoraSpec,
                    scanned: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer slice, PEFT's (lora_A [R, in], lora_B [out, R]) of one module."""
    indices = sorted(i for i in map(expert_index, linear) if i is not None)
    if indices != list(range(1, len(spec.experts) + 1)):
        last = len(spec.experts)
        raise ValueError(f"{path} has LoRA experts {indices} but the LoraSpec describes "
                         f"{last} ({expert_key(1)}..{expert_key(last)})")
    a_parts, b_parts = [], []
    fold = len(spec.experts) > 1
    for i, (expert, scale) in enumerate(zip(spec.experts, spec.scales), start=1):
        a = _host(linear[expert_key(i)]["a"])
        b = _host(linear[expert_key(i)]["b"])
        if a.shape[-1] != expert.rank or b.shape[-2] != expert.rank:
            raise ValueError(f"{path}/{expert_key(i)}: a {a.shape} and b {b.shape} do not have "
                             f"the rank {expert.rank} of LoraSpec expert {i}")
        if a.ndim != (3 if scanned else 2):
            raise ValueError(f"{path}/{expert_key(i)}/a has shape {a.shape}; expected "
                             f"{'[L, in, r] (scanned tree)' if scanned else '[in, r]'}")
        a_parts.append(a)
        # Folding several experts absorbs each scale into b (PEFT's scaling is then 1).
        b_parts.append(b.astype(np.float32) * np.float32(scale) if fold else b)
    a_cat = np.concatenate(a_parts, axis=-1)
    b_cat = np.concatenate(b_parts, axis=-2)
    if not scanned:
        return [(a_cat.T, b_cat.T)]
    return [(a_cat[l].T, b_cat[l].T) for l in range(a_cat.shape[0])]


def _module_names(config: DecoderConfig) -> dict[str, str]:
    """Flax linear template (``layers/{i}/self_attn/q_proj``) -> HF module template."""
    names = {}
    for hf_name, flax_path, _ in family_of(config).param_table:
        if flax_path.endswith("/kernel") and hf_name.endswith(".weight"):
            names[flax_path[: -len("/kernel")]] = hf_name[: -len(".weight")]
    return names


def _hf_module(names: dict[str, str], path: str, layer: int | None) -> str:
    parts = path.split("/")
    if parts[0] == "layers":
        if layer is None:
            layer, rest = int(parts[1]), parts[2:]
        else:
            rest = parts[1:]
        template = "/".join(["layers", "{i}", *rest])
    else:
        template = path
    if template not in names:
        raise ValueError(f"LoRA module {path} has no HF module name in the family table "
                         f"(known linears: {sorted(names)[:4]} ...)")
    return names[template].format(i=layer)


def _target_modules(modules: list[str], config: DecoderConfig) -> list[str]:
    """Short names (``q_proj``) when every layer has the same targets, else full module names.

    PEFT matches a list entry against a module key exactly or as its last dotted components.
    """
    per_layer: dict[str, set[str]] = {}
    outside = []
    for module in modules:
        match = re.match(r"^(.*\.layers\.)(\d+)\.(.+)$", module)
        if match is None:
            outside.append(module)
        else:
            per_layer.setdefault(match.group(2), set()).add(match.group(3))
    layer_sets = list(per_layer.values())
    uniform = (not outside and len(per_layer) == config.num_layers
               and all(s == layer_sets[0] for s in layer_sets))
    if uniform:
        short = {name.rsplit(".", 1)[-1] for name in layer_sets[0]}
        if len(short) == len(layer_sets[0]):
            return sorted(short)
    return sorted(modules)


def _adapter_config(spec: LoraSpec, rank: int, modules: list[str], config: DecoderConfig,
                    base_model_name_or_path: str | None) -> dict:
    if len(spec.experts) == 1:
        alpha, rslora = spec.experts[0].alpha, spec.rslora
    else:
        alpha, rslora = float(rank), False  # scaling = R / R = 1 exactly; scales live in B.
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "lora_dropout": spec.dropout,
        "target_modules": _target_modules(modules, config),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
