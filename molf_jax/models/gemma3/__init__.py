"""Gemma 3 text family: config with presets, decoder block, HF parameter table."""

from molf_jax.models.gemma3.model import Gemma3Block, Gemma3Config, gemma3_layer_types
from molf_jax.models.gemma3.params import PARAM_TABLE

__all__ = ["Gemma3Block", "Gemma3Config", "PARAM_TABLE", "gemma3_layer_types"]
