"""Numerics and kernels chosen by the platform a run lands on, unless the config names them.

The settings the GPU benchmark rows were measured with (`scripts/bench.py`) are the defaults on
NVIDIA GPUs, so ``molf-jax train`` there gets the measured speed and memory; CPUs keep float32
and no rematerialisation (the test suite and the embedded model's main job run there). Each
setting is a `TrainConfig` field whose default is None ("the platform's"); a flag overrides it.
"""

from __future__ import annotations

import jax

from molf_jax.train.config import TrainConfig

__all__ = ["PLATFORM_DEFAULTS", "with_platform_defaults", "describe_numerics"]

_GPU = {"attention": "cudnn", "param_dtype": "bfloat16", "state_dtype": "bfloat16",
        "compute_dtype": "bfloat16", "remat": "full"}
PLATFORM_DEFAULTS = {
    "gpu": _GPU,
    # cuDNN's fused attention is GPU-only; XLA's attention is what runs on TPUs here.
    "tpu": {**_GPU, "attention": "xla"},
    "cpu": {"attention": "xla", "param_dtype": "float32", "state_dtype": "float32",
            "compute_dtype": "float32", "remat": "none"},
}


def with_platform_defaults(config: TrainConfig, platform: str | None = None) -> TrainConfig:
    """``config`` with every platform setting left None filled in for ``platform``
    (default: ``jax.default_backend()``; unknown platforms take the CPU choices).

    Example:
      >>> with_platform_defaults(TrainConfig(), "gpu").attention
      'cudnn'
      >>> with_platform_defaults(TrainConfig(remat="none"), "gpu").remat
      'none'
    """
    platform = platform or jax.default_backend()
    defaults = PLATFORM_DEFAULTS.get(platform, PLATFORM_DEFAULTS["cpu"])
    return config.replace(**{name: value for name, value in defaults.items()
                             if getattr(config, name) is None})


def describe_numerics(config: TrainConfig, platform: str | None = None) -> str:
    """One line for the start of a run: the platform and the settings it runs with."""
    platform = platform or jax.default_backend()
    return (f"{platform}: attention {config.attention}, weights {config.param_dtype}, "
            f"optimizer states {config.state_dtype}, compute {config.compute_dtype}, remat "
            f"{config.remat} (override with --attention, --param-dtype, --state-dtype, "
            f"--compute-dtype, --remat)")
