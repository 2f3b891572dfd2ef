"""How much compiling programs in threads slows the work that runs meanwhile, and why.

In the reproduction's third sitting (docs/reproduction.md) the GPU work that ran beside the
runner's compile threads advanced at 25 to 45 % of its speed alone, with the GPU idle in over
half of nvidia-smi's samples: the host fell behind. This bench repeats that situation on the
real model under conditions that each remove one suspect:

- ``alone``: nothing compiles;
- ``compile``: ``--threads`` threads build and compile the task's programs over and over, as the
  runner does (`molf_jax.experiments.runner.Runner.compiled`, the task's XLA options);
- ``compile_nice``: the same threads at a lower CPU priority (nice 10, inherited by the threads
  the compiler starts): if this restores the speed, the compilers' CPU use starved the host;
- ``compile_no_autotune``: compiles with ``xla_gpu_autotune_level=0``: if this restores it, the
  autotuner's use of the GPU was the cause;
- ``lower_only``: the threads only trace and lower (Python holding the GIL), no XLA compilation.

The measured work is training steps of two compiled programs, one of long steps (sql's lora, 448
tokens) and one of short (fact's lora, 16 tokens), each run for ``--seconds`` in every condition
and synchronised every 4 steps, so steps per second is progress, not queueing. Beside it a thread
sleeps 5 ms at a time and records how late it wakes (the host's responsiveness: CPU and GIL), and
the machine's CPU use is read from ``/proc/stat``. One JSON goes to ``--out``.

Example (one H100, the converted Gemma 3 270M in /tmp/gemma3-270m):
  python scripts/bench_contention.py --model /tmp/gemma3-270m --out bench_contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from molf_jax.device_memory import use_device_memory

CONDITIONS = ("alone", "compile", "compile_nice", "compile_no_autotune", "lower_only")


def cpu_busy_share(before: list[int], after: list[int]) -> float | None:
    """Share of all CPUs' time spent busy between two ``/proc/stat`` 'cpu' lines (user, nice,
    system, idle, iowait, ...): everything but idle and iowait."""
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta)
    if total <= 0:
        return None
    return round(1 - (delta[3] + delta[4]) / total, 3)


def _cpu_times() -> list[int] | None:
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except OSError:  # not Linux
        return None


class _Lateness(threading.Thread):
    """Sleeps ``interval`` at a time and records how much later than asked it woke."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.late = interval, []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.interval)
            self.late.append(time.perf_counter() - t0 - self.interval)

    def summary(self) -> dict:
        late = sorted(self.late) or [0.0]
        return {"wakeups": len(self.late),
                "late_ms_median": round(1e3 * statistics.median(late), 2),
                "late_ms_p99": round(1e3 * late[int(0.99 * (len(late) - 1))], 2),
                "late_ms_max": round(1e3 * late[-1], 2)}


def _background(condition: str, builders, threads: int, stop: threading.Event) -> list:
    """Starts ``threads`` threads that build programs round-robin until ``stop``; returns them
    and a counter list of finished builds."""
    done: list[float] = []

    def loop(offset: int) -> None:
        if condition == "compile_nice" and hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        i = offset
        while not stop.is_set():
            program, options = builders[i % len(builders)]()
            t0 = time.perf_counter()
            if condition == "lower_only":
                program.lower()
            else:
                if condition == "compile_no_autotune":
                    options = {**options, "xla_gpu_autotune_level": 0}
                program.compile(options)
            done.append(time.perf_counter() - t0)
            i += threads

    started = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(threads)]
    for t in started:
        t.start()
    return [started, done]


def _work(compiled, members, iterators, seconds: float) -> dict:
    """Trains for ``seconds``, synchronising every 4 steps; steps per second."""
    import jax
    import jax.numpy as jnp

    from molf_jax.experiments.sweep import _stack_members

    trainable, state, frozen, seeds, peaks = compiled["state"]
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(4):
            batch = _stack_members([[next(it)] for it in iterators])
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            batch["step"] = jnp.full((len(members),), steps, jnp.int32)
            trainable, state, kept = compiled["program"].step(trainable, state, batch, seeds,
                                                              peaks, frozen)
            steps += 1
        jax.block_until_ready(kept["loss"])
    compiled["state"] = (trainable, state, frozen, seeds, peaks)
    return {"steps": steps, "steps_per_s": round(steps / (time.perf_counter() - t0), 2)}


def _ready(runner, task: str, data, mode: str, members: int, remat: str):
    """A compiled program of ``task``'s ``mode`` and its first state, ready to train."""
    from molf_jax.benchmarks.sweep import _build, _programs, first_state

    (program, k), = [(p, k) for p, k in _programs(runner, task, [mode], {mode: members}, data)]
    built, mems, iterators = _build(runner, program, data, k, remat)
    built.compile(dict(data.size.compiler_options))
    return {"program": built, "state": first_state(runner, built, mems)}, mems, iterators


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an HF folder (the converted Gemma 3 270M)")
    p.add_argument("--preset", default="gpu", help="the plan's task sizes (smoke: tests)")
    p.add_argument("--work", nargs="+", default=["sql", "fact"],
                   help="tasks whose lora program (2 members) is the measured work")
    p.add_argument("--compile-tasks", nargs="+", default=["med", "fact"],
                   help="tasks whose programs the background threads compile (med and fact's "
                        "compile in 14 to 37 s, so a condition's threads stop soon)")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=12.0, help="work per task and condition")
    p.add_argument("--out", default="bench_contention.json")
    args = p.parse_args(argv)
    print(use_device_memory(), flush=True)
    import jax

    # Every build compiles: a persistent cache would turn the background's repeats into loads.
    jax.config.update("jax_enable_compilation_cache", False)
    from molf_jax.benchmarks.sweep import _build, _programs
    from molf_jax.experiments.plan import PRESETS
    from molf_jax.experiments.runner import Runner

    runner = Runner(args.model, "/tmp/bench_contention_unused", compute_dtype="bfloat16")
    sizes = PRESETS[args.preset]

    def remat_of(task: str) -> str:
        return (sizes[task].remat or ("none",))[0]

    data = {t: runner.task_data(t, args.preset, (0,)) for t in {*args.work, *args.compile_tasks}}
    work = {t: _ready(runner, t, data[t], "lora", 2, remat_of(t)) for t in args.work}
    builders = []
    for task in args.compile_tasks:
        for program, k in _programs(runner, task, ["fft", "lora", "molf", "molfe"], {},
                                    data[task]):
            builders.append(lambda task=task, program=program, k=k: (
                _build(runner, program, data[task], k, remat_of(task))[0],
                dict(data[task].size.compiler_options)))
    report = {"device": runner.device, "threads": args.threads, "cpus": os.cpu_count(),
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "conditions": {}}
    for condition in args.conditions:
        stop = threading.Event()
        background = (_background(condition, builders, args.threads, stop)
                      if condition != "alone" else [[], []])
        time.sleep(0 if condition == "alone" else 2.0)  # the threads under way
        monitor, cpu0 = _Lateness(), _cpu_times()
        monitor.start()
        result = {}
        for task, (compiled, members, iterators) in work.items():
            result[task] = _work(compiled, members, iterators, args.seconds)
        monitor.stop.set()
        monitor.join()
        cpu1 = _cpu_times()
        result["host"] = monitor.summary()
        result["cpu_busy"] = cpu_busy_share(cpu0, cpu1) if cpu0 and cpu1 else None
        stop.set()
        for t in background[0]:
            t.join()
        result["builds_finished"] = len(background[1])
        report["conditions"][condition] = result
        print(f"{condition}: {json.dumps(result)}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
