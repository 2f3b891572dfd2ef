"""Compiling a sweep's programs in worker processes that fill JAX's persistent compilation cache.

The runner compiles its programs ahead, in threads, while another program trains. In the
reproduction's third sitting the work beside those threads advanced at 25 to 45 % of its speed
alone, with the GPU idle in over half the samples (docs/reproduction.md): the threads share the
process with the one that feeds the GPU (its GIL, its CPUs, its CUDA context). A worker process
shares none of these: it builds the same `MemberProgram` from abstract shapes and compiles it,
which writes the executable to the persistent cache; the runner's own compilation of the
program then loads it from there instead of compiling.

A job whose program the runner lowers differently (another JAX, other flags) only costs the
worker's time: the runner's compilation misses the cache and compiles as before.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["CompileJob", "compile_job", "worker_pool", "enable_cache"]


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """What a worker needs to build and compile one program (all picklable).

    Attributes:
      model_dir: the HF folder (its config.json gives the shapes; no weights are read).
      config: the runs' `TrainConfig` (as `MemberProgram` takes it).
      num_members, total_steps, batch_shape, loss_tokens: as `MemberProgram`'s.
      compiler_options: XLA options of the step, as ``(name, value)`` pairs.
    """

    model_dir: str
    config: Any
    num_members: int
    total_steps: int
    batch_shape: tuple[int, int, int]
    loss_tokens: int | None
    compiler_options: tuple[tuple[str, Any], ...] = ()


def enable_cache(cache_dir: str) -> None:
    """Points JAX's persistent compilation cache at ``cache_dir`` and caches every program (by
    default only those that took over a second). Call it before the process's first
    compilation: JAX decides once whether the cache is in use."""
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _start_worker(cache_dir: str, nice: int) -> None:
    # Allocate device memory on demand: the runner's process holds most of the GPU.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    enable_cache(cache_dir)


def compile_job(job: CompileJob) -> float:
    """Builds and compiles ``job``'s program in this process (a worker); returns the seconds
    it took. The executable itself goes to the persistent cache."""
    import jax.numpy as jnp

    from molf_jax import models
    from molf_jax.experiments.sweep import MemberProgram
    from molf_jax.train.setup import resolve_model

    started = time.time()
    model_config = resolve_model(job.model_dir).config
    # The shapes and dtypes `load_hf(..., scan_layers=True)` gives the runner's base params.
    abstract = models.abstract_params(models.build_model(model_config, scan_layers=True,
                                                         param_dtype=jnp.float32))
    MemberProgram(job.config, model_config, abstract, job.num_members, job.total_steps,
                  job.batch_shape, loss_tokens=job.loss_tokens).compile(
                      dict(job.compiler_options))
    return time.time() - started


def worker_pool(workers: int, cache_dir: str, *, nice: int = 0) -> ProcessPoolExecutor:
    """``workers`` fresh processes (spawned: no state of this one) that compile `CompileJob`s
    into the cache at ``cache_dir``, at ``nice`` lower CPU priority."""
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(cache_dir, nice))
