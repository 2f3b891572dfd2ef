"""How much compiling programs in threads slows the training that runs meanwhile, and why; see
`molf_jax.benchmarks.contention`.

  python scripts/bench_contention.py --model /tmp/gemma3-270m --out bench_contention.json
"""

from molf_jax.benchmarks.contention import main

if __name__ == "__main__":
    main()
