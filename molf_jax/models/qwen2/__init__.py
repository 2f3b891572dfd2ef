"""Qwen2 / Qwen2.5 family: config with presets, decoder block, HF parameter table."""

from molf_jax.models.qwen2.model import Qwen2Block, Qwen2Config
from molf_jax.models.qwen2.params import PARAM_TABLE

__all__ = ["PARAM_TABLE", "Qwen2Block", "Qwen2Config"]
