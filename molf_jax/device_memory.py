"""How much of each GPU JAX's allocator may take, set before JAX starts.

JAX preallocates 75% of a GPU's memory unless told otherwise, which leaves a quarter of an
80 GB card unused: Qwen2.5-7B's MoLF step needs 62.7 GiB and ran out of memory at the default
(it runs at ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.97``). The command-line tools, the benchmark and
the reproduction call `use_device_memory` first, so JAX may take 95% unless the user has set
the variable. It must run before JAX initialises its backend (the first device query or array
placed on a device); importing jax or molf_jax does not initialise it.

Example:
  >>> import os
  >>> line = use_device_memory()   # in a fresh process, before anything touches a device
  >>> os.environ[MEMORY_FRACTION_VARIABLE] in line
  True
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_MEMORY_FRACTION", "MEMORY_FRACTION_VARIABLE", "use_device_memory"]

MEMORY_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# Leaves about 4 GB of an 80 GB card to the CUDA context, cuDNN workspaces and other processes.
DEFAULT_MEMORY_FRACTION = "0.95"


def use_device_memory(fraction: str = DEFAULT_MEMORY_FRACTION) -> str:
    """Sets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` to ``fraction`` unless the user has set it, and
    returns one line saying which value is in force and where it came from (for a run's first
    line). Call it before JAX's backend starts; afterwards the variable no longer counts.

    Example:
      >>> print(use_device_memory())  # doctest: +SKIP
      device memory: JAX may take 0.95 of each GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, set by molf_jax; set it yourself to change it)
    """
    if os.environ.get(MEMORY_FRACTION_VARIABLE):
        origin = "yours"
    else:
        os.environ[MEMORY_FRACTION_VARIABLE] = fraction
        origin = "set by molf_jax; set it yourself to change it"
    return (f"device memory: JAX may take {os.environ[MEMORY_FRACTION_VARIABLE]} of each GPU "
            f"({MEMORY_FRACTION_VARIABLE}, {origin})")
