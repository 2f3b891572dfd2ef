"""Checkpoint I/O: HF safetensors folders in and out, GGUF -> HF conversion.

Example:
  >>> from molf_jax.checkpoints import default_model_dir, load_hf
  >>> config, params = load_hf(default_model_dir())   # doctest: +SKIP
"""

# HF folders (safetensors, sharded index) <-> Flax params
from molf_jax.checkpoints.hf import check_tokenizer_vocab, load_hf, load_hf_params, save_hf

# GGUF -> HF folder, and the embedded Gemma 3 270M converted once into a cache
from molf_jax.checkpoints.gguf import convert_gguf_to_hf
from molf_jax.checkpoints.default_model import default_model_dir

# LoRA experts -> one PEFT adapter (experts folded into one rank, scalings absorbed)
from molf_jax.checkpoints.peft import check_base_unchanged, save_peft_adapter

__all__ = [
    "check_base_unchanged",
    "check_tokenizer_vocab",
    "convert_gguf_to_hf",
    "default_model_dir",
    "load_hf",
    "load_hf_params",
    "save_hf",
    "save_peft_adapter",
]
