"""Our GPU forward pass (cuDNN attention, bf16) against transformers on tiny random models; see
`molf_jax.benchmarks.gpu_parity`.

  python scripts/gpu_parity.py                     # tiny Gemma 3 and Qwen2
  python scripts/gpu_parity.py --model ~/.cache/molf_jax/gemma3-270m   # also a real folder
"""

import sys

from molf_jax.benchmarks.gpu_parity import main

if __name__ == "__main__":
    sys.exit(main())
