"""Times training steps on random-init models of the paper's shapes; see
`molf_jax.benchmarks.step` for what it measures and writes.

  python scripts/bench.py --model qwen2.5-1.5b --mode molf --batch 8 --length 512
"""

from molf_jax.benchmarks.step import main

if __name__ == "__main__":
    main()
