"""Our GPU forward pass (cuDNN attention, bf16) against transformers, on tiny random models.

The GPU defaults of `molf-jax train` (`molf_jax.train.platform`) run attention through cuDNN's
flash kernel and compute in bf16; no CPU test reaches that kernel. This script builds a tiny
random Gemma 3 (local layers with a sliding window shorter than the sequence) and a tiny random
Qwen2 with transformers, loads them into JAX, and compares logits on right-padded rows (the
layout the cuDNN path takes) at every real position:

* ``xla-f32``:  our XLA attention in float32 against transformers in float32 (the port);
* ``<attn>-bf16 vs transformers``: our GPU numerics against transformers in float32;
* ``<attn>-bf16 vs xla-bf16``: the cuDNN kernel against our XLA attention at equal numerics,
  which isolates what the kernel is given (window, causality, padding) from bf16 rounding.

Each line prints the largest absolute difference, that difference relative to the largest
reference logit, and the share of positions whose top-1 token agrees. The exit status is 1 when
any comparison misses its bound. On a machine without a GPU (or without cuDNN) it says so and
checks the XLA path in bf16 instead.

Examples:
  python scripts/gpu_parity.py                     # tiny Gemma 3 and Qwen2
  python scripts/gpu_parity.py --model ~/.cache/molf_jax/gemma3-270m   # also a real folder
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from molf_jax.device_memory import use_device_memory

# Bounds on max |ours - reference| / max |reference|. float32 ports agree to rounding; bf16
# carries 8 significant bits through every layer; two attention kernels at equal (bf16)
# numerics differ by their summation order only.
PORT_BOUND = 1e-4
BF16_BOUND = 4e-2
KERNEL_BOUND = 3e-2
TOP1_BOUND = 0.9  # share of positions whose argmax agrees, bf16 against float32


def tiny_configs(vocab: int = 256) -> dict:
    """Tiny transformers configs: Gemma 3 with a window of 4 on alternate layers (so a window
    one key off changes every local layer), and Qwen2 with GQA and q/k/v biases."""
    import transformers

    gemma3 = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=32,
        rope_theta=10_000.0, max_position_embeddings=512, final_logit_softcapping=None)
    qwen2 = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10_000.0, tie_word_embeddings=False)
    return {"gemma3": gemma3, "qwen2": qwen2}


def save_random_model(config, path: Path, seed: int = 0) -> Path:
    """A random transformers model (norm weights and biases perturbed, so none is trivially 0
    or 1) saved as an HF folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(path)
    return path


def right_padded_batch(vocab: int, length: int, seed: int = 0):
    """Three rows of ``length`` slots: full, 3/4 and 1/4 real tokens, padding on the right."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (3, length)).astype(np.int32)
    lengths = np.array([length, 3 * length // 4, max(1, length // 4)])
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def transformers_logits(folder: Path, ids, mask):
    """Float32 logits of transformers (eager attention, on the CPU)."""
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def our_logits(folder: Path, ids, mask, *, attention: str, dtype: str):
    import jax.numpy as jnp
    import numpy as np

    from molf_jax.checkpoints import load_hf
    from molf_jax.models import build_model

    import jax

    dtype = jnp.dtype(dtype)
    config, params = load_hf(folder, param_dtype=dtype, check_tokenizer=False)
    model = build_model(config, attention_impl=attention, dtype=dtype, param_dtype=dtype)
    # float32 means float32: a GPU's default matmul precision for float32 is TF32, which put
    # the tiny models 1.4e-3 (Gemma 3) and 5.4e-4 (Qwen2) off transformers on an H100, against
    # 1.3e-6 and 5.6e-7 at full precision.
    precision = "highest" if dtype == jnp.float32 else "default"
    with jax.default_matmul_precision(precision):
        logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(logits, np.float32)


def cudnn_status() -> str | None:
    """None when cuDNN's attention runs here, else why not."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        return f"no GPU (JAX backend {jax.default_backend()!r})"
    x = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    try:
        jax.block_until_ready(jax.nn.dot_product_attention(x, x, x, is_causal=True,
                                                           implementation="cudnn"))
    except Exception as err:  # any refusal of the kernel means: not here
        return f"cuDNN attention unavailable: {type(err).__name__}: {err}"
    return None


def compare(name: str, ours, reference, mask, bound: float, *, top1: float | None = None
            ) -> bool:
    """Prints one line for ``ours`` against ``reference`` over the real positions; True when
    within ``bound`` (and ``top1``)."""
    import numpy as np

    real = mask.astype(bool)
    got, want = ours[real], reference[real]
    max_abs = float(np.abs(got - want).max())
    relative = max_abs / float(np.abs(want).max())
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    ok = relative <= bound and (top1 is None or agree >= top1)
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<38} max abs {max_abs:.3e}  rel {relative:.3e} "
          f"(bound {bound:.1e})  top-1 agree {agree:.3f}", flush=True)
    return ok


def check_folder(name: str, folder: Path, ids, mask, attention: str) -> bool:
    print(f"{name}: {folder} ({ids.shape[0]} right-padded rows of {ids.shape[1]}, real lengths "
          f"{mask.sum(1).tolist()})", flush=True)
    reference = transformers_logits(folder, ids, mask)
    xla32 = our_logits(folder, ids, mask, attention="xla", dtype="float32")
    xla16 = our_logits(folder, ids, mask, attention="xla", dtype="bfloat16")
    results = [compare("xla-f32 vs transformers-f32", xla32, reference, mask, PORT_BOUND),
               compare("xla-bf16 vs transformers-f32", xla16, reference, mask, BF16_BOUND,
                       top1=TOP1_BOUND)]
    if attention == "cudnn":
        fast = our_logits(folder, ids, mask, attention="cudnn", dtype="bfloat16")
        results += [compare("cudnn-bf16 vs transformers-f32", fast, reference, mask,
                            BF16_BOUND, top1=TOP1_BOUND),
                    compare("cudnn-bf16 vs xla-bf16", fast, xla16, mask, KERNEL_BOUND)]
    return all(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[],
                        help="also an HF folder (e.g. the converted Gemma 3 270M); repeatable")
    parser.add_argument("--length", type=int, default=64, help="slots per row")
    args = parser.parse_args(argv)
    print(use_device_memory(), flush=True)

    import jax

    why_not = cudnn_status()
    attention = "xla" if why_not else "cudnn"
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}: "
          + (f"{why_not}; checking the XLA path only" if why_not else
             "checking cuDNN attention"), flush=True)
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-parity-") as tmp:
        for name, config in tiny_configs().items():
            folder = save_random_model(config, Path(tmp) / name)
            ids, mask = right_padded_batch(config.vocab_size, args.length)
            ok &= check_folder(f"tiny {name}", folder, ids, mask, attention)
    for folder in args.model:
        import json

        vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        ids, mask = right_padded_batch(vocab, args.length, seed=1)
        ok &= check_folder(Path(folder).name, Path(folder), ids, mask, attention)
    print("all within bounds" if ok else "FAILED: see the lines marked FAIL", flush=True)
    return 0 if ok else 1

