"""Compiling a sweep's programs in worker processes, whose executables the runner loads.

The runner compiles its programs ahead, in threads, while another program trains. In the
reproduction's third sitting the work beside those threads advanced at 25 to 45 % of its speed
alone, with the GPU idle in over half the samples (docs/reproduction.md): the threads share the
process with the one that feeds the GPU (its GIL, its CPUs). A worker process shares neither: it
builds the same `MemberProgram` from abstract shapes, compiles it and returns the executables
serialized (`MemberProgram.serialize`); the runner loads them (`MemberProgram.load`) without
lowering or compiling them itself (building the program object traces only its shapes).

The workers are this machine's own processes started by the runner, so their bytes are trusted
(loading an executable unpickles it).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["CompileJob", "compile_job", "worker_pool"]


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


def _start_worker(nice: int) -> None:
    # Allocate device memory on demand: the runner's process holds most of the GPU.
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    import jax

    # What the worker returns is the executable itself; one the persistent cache gave back
    # serializes incompletely (`MemberProgram.serialize`).
    jax.config.update("jax_enable_compilation_cache", False)


def compile_job(job: CompileJob) -> tuple[float, bytes]:
    """Builds and compiles ``job``'s program in this process (a worker); returns the seconds
    it took and the executables (`MemberProgram.serialize`)."""
    import jax.numpy as jnp

    from molf_jax import models
    from molf_jax.experiments.sweep import MemberProgram
    from molf_jax.train.setup import resolve_model

    started = time.time()
    model_config = resolve_model(job.model_dir).config
    # The shapes and dtypes `load_hf(..., scan_layers=True)` gives the runner's base params.
    abstract = models.abstract_params(models.build_model(model_config, scan_layers=True,
                                                         param_dtype=jnp.float32))
    program = MemberProgram(job.config, model_config, abstract, job.num_members,
                            job.total_steps, job.batch_shape, loss_tokens=job.loss_tokens)
    serialized = program.compile(dict(job.compiler_options)).serialize()
    return time.time() - started, serialized


def worker_pool(workers: int, *, nice: int = 0) -> ProcessPoolExecutor:
    """``workers`` fresh processes (spawned: no state of this one) that compile `CompileJob`s,
    at ``nice`` lower CPU priority."""
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(nice,))
