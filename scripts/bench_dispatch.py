"""How much a thread that builds programs slows the main thread's dispatches, at several switch
intervals (the reason `molf_jax.experiments.runner.COMPILING_SWITCH_INTERVAL` exists).

The main thread makes 1,000 small jitted calls, each read back (as a training loop or scoring
dispatches and reads); a second thread traces and lowers the reproduction's vmapped step for the
Gemma 3 270M's shapes over and over (abstract shapes: no weights, no device memory), as the
runner's compile threads do before XLA compiles. Prints the median seconds of five repetitions
alone and beside that thread, for each interval.

  python scripts/bench_dispatch.py
"""

import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np


def _lower_step(config, model_config, abstract) -> None:
    from molf_jax.experiments.sweep import MemberProgram

    k = 3
    program = MemberProgram(config, model_config, abstract, k, 40, (1, 32, 64), loss_tokens=64)
    stacked = lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype)  # noqa: E731
    trainable = jax.tree.map(stacked, program._abstract[0])
    peaks = jax.ShapeDtypeStruct((k, 2), jnp.float32)
    state = jax.eval_shape(program.init, trainable, peaks)
    batch = {key: jax.ShapeDtypeStruct((k, 1, 32, 64), jnp.int32)
             for key in ("input_ids", "attention_mask", "loss_mask")}
    batch["step"] = jax.ShapeDtypeStruct((k,), jnp.int32)
    program.step.lower(trainable, state, batch, jax.ShapeDtypeStruct((k,), jnp.int32), peaks,
                       program._abstract[1])


def main() -> None:
    from molf_jax import models
    from molf_jax.train import PLATFORM_DEFAULTS, TrainConfig

    model_config = models.preset("gemma3-270m")
    abstract = models.abstract_params(models.build_model(model_config, scan_layers=True))
    config = TrainConfig(model="gemma3-270m", task="fact", batch_size=32, mode="molf",
                         steps=40, mesh="data=1,fsdp=1,tensor=1",
                         **{**PLATFORM_DEFAULTS["cpu"], "compute_dtype": "bfloat16"})
    small = jax.jit(lambda x: x * 2 + 1)
    x = jnp.ones((64, 64))

    def dispatches(n: int = 1000) -> float:
        started = time.perf_counter()
        for _ in range(n):
            np.asarray(small(x))
        return time.perf_counter() - started

    def median_of_five() -> float:
        return sorted(dispatches() for _ in range(5))[2]

    dispatches()
    print(f"alone: {median_of_five():.3f} s", flush=True)
    default = sys.getswitchinterval()
    for interval in (default, 5e-4, 1e-4):
        sys.setswitchinterval(interval)
        stop = threading.Event()

        def lower_until_stopped():
            while not stop.is_set():
                _lower_step(config, model_config, abstract)

        thread = threading.Thread(target=lower_until_stopped)
        thread.start()
        time.sleep(2.0)
        seconds = median_of_five()
        stop.set()
        thread.join()
        print(f"beside a lowering thread, switch interval {interval * 1e3:g} ms: "
              f"{seconds:.3f} s", flush=True)
    sys.setswitchinterval(default)


if __name__ == "__main__":
    main()
