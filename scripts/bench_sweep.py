"""Times the reproduction's parts (compile, train step per member, scoring) on the real model;
see `molf_jax.benchmarks.sweep`.

  python scripts/bench_sweep.py --model /tmp/gemma3-270m --out bench_sweep.json
"""

from molf_jax.benchmarks.sweep import main

if __name__ == "__main__":
    main()
