"""AdaLoRA triplets out as a PEFT AdaLoRA adapter, the files ``save_pretrained`` writes.

peft 0.21 stores, per target module, only the singular triplets the allocator kept
(``rank_pattern`` in ``adapter_config.json`` lists which, per module)::

    base_model.model.model.layers.3.self_attn.q_proj.lora_A   [kept, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_E   [kept, 1]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B   [out, kept]

and on loading shrinks each module to its kept rank while keeping the scale
``lora_alpha / (init_r + 1e-5)``, so ``PeftModel.from_pretrained`` computes our forward pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from molf_jax.adalora import AdaLoraSchedule, AdaLoraSpec, adalora_triplets
from molf_jax.checkpoints.folders import check_destination
from molf_jax.checkpoints.hf import _host, _is_scanned
from molf_jax.checkpoints.peft import (_PEFT_PREFIX, _hf_module, _module_names, _target_modules,
                                       _write_adapter)
from molf_jax.models import DecoderConfig

__all__ = ["save_peft_adalora_adapter"]


def save_peft_adalora_adapter(out_dir: str | os.PathLike, params: Mapping,
                              model_config: DecoderConfig, spec: AdaLoraSpec,
                              schedule: AdaLoraSchedule, keep: Mapping[str, Any], *,
                              base_model_name_or_path: str | None, orth_reg_weight: float = 0.5,
                              dtype: Any = None, overwrite: bool = False,
                              protected: tuple = ()) -> Path:
    """Writes the AdaLoRA triplets of ``params`` as a PEFT AdaLoRA adapter.

    Args:
      out_dir: destination folder (created).
      params: trained tree with ``adalora/{a,e,b}`` leaves (unscanned or scanned).
      model_config: the model's config (gives the HF module names).
      spec: the triplets' spec (init_r, alpha, targets, dropout).
      schedule: the allocator's settings (recorded in the config, as peft does).
      keep: ``{module path: bool [.., init_r]}``, the kept singular values
        (``molf_jax.adalora.rank_pattern(opt_state)``).
      base_model_name_or_path: recorded in ``adapter_config.json``.
      orth_reg_weight: recorded too (peft reads it when training continues).
      dtype: storage dtype of the tensors; default the ``a`` leaves'.
      overwrite, protected: as in `molf_jax.checkpoints.save_hf` (written beside ``out_dir``
        and renamed into place; never over a model molf_jax did not write unless overwrite).

    Returns:
      The folder path.

    Example:
      >>> save_peft_adalora_adapter("run/adapter", params, config, spec, schedule,  # doctest: +SKIP
      ...                           rank_pattern(opt_state), base_model_name_or_path=None)
      >>> model = PeftModel.from_pretrained(base, "run/adapter")                  # doctest: +SKIP
    """
    check_destination(out_dir, overwrite=overwrite, protected=protected)
    scanned = _is_scanned(params)
    names = _module_names(model_config)
    tensors: dict[str, np.ndarray] = {}
    pattern: dict[str, list[bool]] = {}
    for path, triplet in adalora_triplets(params):
        if path not in keep:
            raise ValueError(f"no rank pattern for the AdaLoRA module {path}")
        a, e, b, kept = (_host(triplet["a"]), _host(triplet["e"]), _host(triplet["b"]),
                         np.asarray(keep[path], bool))
        slices = range(a.shape[0]) if scanned else [None]
        for layer in slices:
            pick = (lambda x: x) if layer is None else (lambda x, l=layer: x[l])  # noqa: E731
            mask = pick(kept)
            module = _hf_module(names, path, layer)
            out_dtype = np.dtype(dtype) if dtype is not None else a.dtype
            prefix = f"{_PEFT_PREFIX}{module}"
            tensors[f"{prefix}.lora_A"] = np.ascontiguousarray(pick(a).T[mask].astype(out_dtype))
            tensors[f"{prefix}.lora_E"] = np.ascontiguousarray(
                pick(e)[mask][:, None].astype(out_dtype))
            tensors[f"{prefix}.lora_B"] = np.ascontiguousarray(
                pick(b).T[:, mask].astype(out_dtype))
            pattern[f"{module}.lora_E"] = mask.tolist()
    if not tensors:
        raise ValueError("params hold no AdaLoRA triplets: there is no adapter to export")

    config = {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "init_r": spec.init_r,
        "target_r": schedule.target_r,
        "tinit": schedule.tinit,
        "tfinal": schedule.tfinal,
        "deltaT": schedule.deltaT,
        "beta1": schedule.beta1,
        "beta2": schedule.beta2,
        "total_step": schedule.total_step,
        "orth_reg_weight": orth_reg_weight,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _target_modules([m[: -len(".lora_E")] for m in pattern],
                                          model_config),
        "rank_pattern": pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    return _write_adapter(out_dir, tensors, config, kind="peft_adalora_adapter",
                          overwrite=overwrite, protected=protected)
