"""Collective traffic of the benchmark's train step per device and step, from its compiled HLO
on simulated CPU devices (`molf_jax.benchmarks.collectives`).

  python scripts/collectives.py --devices 4 --model qwen2.5-3b --mode molf --batch 32 --length 512
"""

import os
import sys

if __name__ == "__main__":
    # Before JAX starts: simulated devices, and no executable cache (a cached one dumps no HLO).
    devices = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--devices"),
                   "4")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the partitioner's warnings

    from molf_jax.benchmarks.collectives import main

    main()
