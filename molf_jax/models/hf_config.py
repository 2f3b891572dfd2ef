"""Reading HF ``config.json`` values that changed spelling across transformers versions.

transformers 4.x writes ``rope_theta`` / ``rope_scaling`` (and Gemma's ``rope_local_base_freq``);
5.x writes ``rope_parameters`` (per layer type for Gemma 3). Both are accepted.
"""

from __future__ import annotations

from typing import Any

__all__ = ["eos_for_hf", "rope_setting"]

SUPPORTED_ROPE_TYPES = ("default", "linear")


def rope_setting(hf: dict, *, layer_type: str | None, legacy_theta_key: str,
                 default_theta: float, legacy_scaling: bool, where: str) -> tuple[float, float]:
    """(theta, linear factor) of one layer type's rotary embedding.

    Args:
      hf: the config dict.
      layer_type: key inside a per-layer-type ``rope_parameters`` (Gemma 3), or None (flat).
      legacy_theta_key: the 4.x key holding theta (``rope_theta``, ``rope_local_base_freq``).
      default_theta: the family default when no key is present.
      legacy_scaling: whether the 4.x ``rope_scaling`` applies to this layer type.
      where: names the config in error messages.
    """
    params: Any = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    elif isinstance(params, dict) and layer_type is not None and "rope_theta" not in params:
        params = None
    if not isinstance(params, dict):
        params = dict(hf.get("rope_scaling") or {}) if legacy_scaling else {}
        params.setdefault("rope_theta", hf.get(legacy_theta_key, default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported "
                         f"(supported: {SUPPORTED_ROPE_TYPES})")
    theta = float(params.get("rope_theta", default_theta))
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return theta, factor


def eos_for_hf(eos: tuple[int, ...]):
    """Our tuple of EOS ids in HF's spelling: None, an int, or a list."""
    return None if not eos else eos[0] if len(eos) == 1 else list(eos)
