"""Tiny random transformers checkpoints for offline parity tests (built here, never downloaded)."""

from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 128


def qwen2_config(**overrides) -> transformers.Qwen2Config:
    """GQA (4 query heads, 2 kv heads) with q/k/v biases and an untied head by default."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_theta=1000.0, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    return transformers.Qwen2Config(**{**fields, **overrides})


def gemma3_config(**overrides) -> transformers.Gemma3TextConfig:
    """Local/global layers alternating, window 4, linear rope scaling on global layers, and
    query_pre_attn_scalar different from head_dim."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                  sliding_window_pattern=2, query_pre_attn_scalar=24, rope_theta=10_000.0,
                  rope_local_base_freq=500.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  max_position_embeddings=256)
    return transformers.Gemma3TextConfig(**{**fields, **overrides})


def random_model(config, seed: int = 0) -> torch.nn.Module:
    """A causal LM with random weights, biases and norm weights (so none is trivially 0 or 1)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def save(model: torch.nn.Module, path: Path, max_shard_size=None) -> Path:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def hf_logits(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits with positions from the mask (cumsum - 1), as our models count them."""
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(position_ids))
    return out.logits.float().numpy()


def padded_batch(length: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows: full, right-padded (last 4 slots) and left-padded (first 3 slots)."""
    ids = np.random.RandomState(seed).randint(3, VOCAB, (3, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, -4:] = 0
    mask[2, :3] = 0
    ids[mask == 0] = 0
    return ids, mask
