"""What the corruption checks of issue 26 cost, at the embedded model's size.

Times `molf_jax.train.checkpoint.value_checksums` (computed on every checkpoint save and again
on every restore) over a tree shaped like a molf run of Gemma 3 270M (every base parameter
trains, plus one rank-128 LoRA expert and AdamW's two moments per leaf), and the SHA-256 of the
converted cache (`molf_jax.checkpoints.default_model`, checked at every start that uses the
default model).

    python scripts/checksum_cost.py            # the figures in docs/reliability.md
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from molf_jax.checkpoints.default_model import default_model_dir, file_sha256
from molf_jax.train.checkpoint import value_checksums


def gemma_270m_molf_tree(rank: int = 128) -> dict:
    """Arrays of the shapes a molf run of Gemma 3 270M checkpoints (random values)."""
    vocab, d, f, layers, heads, kv, head_dim = 262_144, 640, 2048, 18, 4, 1, 256
    shapes = {"embed": (vocab, d)}
    for i in range(layers):
        for name, (n_in, n_out) in {"q": (d, heads * head_dim), "k": (d, kv * head_dim),
                                    "v": (d, kv * head_dim), "o": (heads * head_dim, d),
                                    "gate": (d, f), "up": (d, f), "down": (f, d)}.items():
            shapes[f"{i}/{name}"] = (n_in, n_out)
            shapes[f"{i}/{name}/lora_a"] = (n_in, rank)
            shapes[f"{i}/{name}/lora_b"] = (rank, n_out)
    keys = jax.random.split(jax.random.key(0), len(shapes))
    params = {k: jax.random.normal(key, s, jnp.float32) for key, (k, s) in zip(keys, shapes.items())}
    return {"params": params, "mu": params, "nu": params}  # the moments have the same shapes


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tree = gemma_270m_molf_tree()
    jax.block_until_ready(tree)
    size = sum(x.nbytes for x in jax.tree.leaves(tree))
    value_checksums(tree)  # compiles
    seconds = best_of(lambda: value_checksums(tree), args.repeats)
    print(f"value checksums of a checkpoint ({size / 2**30:.2f} GiB, "
          f"{len(jax.tree.leaves(tree))} arrays) on {jax.devices()[0].platform}: {seconds:.2f} s "
          f"per save and per restore ({size / 2**30 / seconds:.1f} GiB/s)")

    cache = default_model_dir()
    weights = cache / "model.safetensors"
    seconds = best_of(lambda: file_sha256(weights), args.repeats)
    print(f"SHA-256 of the converted cache's weights ({weights.stat().st_size / 2**30:.2f} GiB): "
          f"{seconds:.2f} s per start ({weights.stat().st_size / 2**30 / seconds:.1f} GiB/s)")


if __name__ == "__main__":
    main()
