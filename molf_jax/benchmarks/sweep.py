"""Where the reproduction's time goes, one part at a time, on the real model and the plan's data:
compiling a vmapped program (alone, then several at once as the runner's compile threads do),
its training step per member, and scoring one member at several batch sizes.

Each (task, mode) program is built exactly as `molf_jax.experiments.runner.Runner` builds it
(same config, batch shape, target budget and K members). Step times are medians of
``--steps`` steps after two warm-up steps, synchronised on the last one; scoring times are the
second of two calls (the first compiles). XLA flags (``XLA_FLAGS``) are the caller's: run the
script once per setting to compare them. With ``--trace DIR`` three more steps of each program
are profiled (`jax.profiler`, a Perfetto trace under DIR) and summarised in the report: the
wall time of the steps, the time the device was busy, its kernel launches and the kernels that
took the most time (`trace_summary`). One JSON goes to ``--out``.

Example (one H100, the converted Gemma 3 270M in /tmp/gemma3-270m):
  python scripts/bench_sweep.py --model /tmp/gemma3-270m --tasks fact sql --out bench_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from molf_jax.device_memory import use_device_memory


def _programs(runner, task: str, modes, members: dict[str, int], data):
    from molf_jax.experiments.plan import Plan, programs

    chosen = []
    for program in programs(Plan((task,), tuple(modes), (0,), study=False), task):
        if program.settings["mode"] in modes and "top_k" not in program.settings:
            k = members.get(program.settings["mode"], len(program.members))
            chosen.append((program, k))
    return chosen


def _build(runner, program, data, k: int, remat: str):
    import dataclasses

    from molf_jax.data import pad_token_id
    from molf_jax.experiments.sweep import MemberProgram, member_batches, member_loss_tokens

    config = dataclasses.replace(runner._config(program, data.size, None), remat=remat)
    members = [program.members[i % len(program.members)] for i in range(k)]
    examples = [data.train[m.seed] for m in members]
    iterators, total = member_batches(config, examples, members,
                                      pad_id=pad_token_id(runner.tokenizer),
                                      lengths=(data.length,))
    budget = member_loss_tokens(config, examples)
    shape = (config.grad_accum, config.batch_size, data.length)
    return MemberProgram(config, runner.source.config, runner.base_params, k, total, shape,
                         loss_tokens=budget), members, iterators


def trace_summary(trace_dir: str, top: int = 12) -> dict:
    """Device activity of a Perfetto trace written by ``jax.profiler.trace(...,
    create_perfetto_trace=True)``, per line of the device (its streams, and the XLA op and
    module lines where the profiler writes them): events, time covered (the sum of the events'
    durations), the span from the first event to the last, and the names of most total time."""
    import glob
    import gzip

    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))
    if not paths:
        return {"error": f"no perfetto_trace.json.gz under {trace_dir}"}
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in meta
                 if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", "")) for e in meta
               if e.get("name") == "thread_name"}
    lines: dict[tuple, list[dict]] = {}
    for e in events:
        if e.get("ph") == "X" and "/device:" in processes.get(e.get("pid"), ""):
            lines.setdefault((e["pid"], e.get("tid")), []).append(e)
    if not lines:
        return {"error": "no device events in the trace", "processes": sorted(processes.values())}
    out = {}
    for key, line in sorted(lines.items(), key=lambda kv: -len(kv[1])):
        per_name: dict[str, list[float]] = {}
        for e in line:
            per_name.setdefault(e["name"], []).append(float(e.get("dur", 0)))
        start = min(float(e["ts"]) for e in line)
        end = max(float(e["ts"]) + float(e.get("dur", 0)) for e in line)
        busiest = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        out[f"{processes[key[0]]} | {threads.get(key, key[1])}"] = {
            "events": len(line), "distinct": len(per_name),
            "span_ms": round((end - start) / 1e3, 2),
            "covered_ms": round(sum(float(e.get("dur", 0)) for e in line) / 1e3, 2),
            "top": [{"name": n[:100], "count": len(d), "total_ms": round(sum(d) / 1e3, 3)}
                    for n, d in busiest]}
    return out


def first_state(runner, compiled, members):
    """The members' first state for a compiled `MemberProgram`, as `train_members` makes it:
    ``(trainable, opt_state, frozen, seeds, peaks)``."""
    import jax
    import jax.numpy as jnp

    from molf_jax.param_roles import split_trainable
    from molf_jax.train.setup import add_mode_adapters

    trainables = []
    for m in members:
        _, key = jax.random.split(jax.random.key(m.seed))
        params, _ = add_mode_adapters(compiled.config, runner.base_params, key)
        trainable, frozen = split_trainable(params, compiled.roles)
        trainables.append(trainable)
    trainable = jax.tree.map(lambda *xs: jnp.stack(xs), *trainables)
    del trainables
    peaks = jnp.asarray([[m.fft_lr, m.lora_lr] for m in members], jnp.float32)
    seeds = jnp.asarray([m.seed for m in members], jnp.int32)
    return trainable, compiled.init(trainable, peaks), frozen, seeds, peaks


def _time_steps(runner, compiled, members, iterators, steps: int,
                trace_dir: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from molf_jax.experiments.sweep import _stack_members

    trainable, state, frozen, seeds, peaks = first_state(runner, compiled, members)
    times = []
    for step in range(steps + 2):
        batch = _stack_members([[next(it)] for it in iterators])
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        batch["step"] = jnp.full((len(members),), step, jnp.int32)
        t0 = time.perf_counter()
        trainable, state, kept = compiled.step(trainable, state, batch, seeds, peaks, frozen)
        jax.block_until_ready(kept["loss"])
        times.append(time.perf_counter() - t0)
    median = statistics.median(times[2:])
    stats = jax.local_devices()[0].memory_stats() or {}
    out = {"step_ms": round(1e3 * median, 2),
           "member_step_ms": round(1e3 * median / len(members), 2),
           "peak_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 1)}
    if trace_dir is not None:
        batches = []
        for step in range(3):
            batch = _stack_members([[next(it)] for it in iterators])
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
            batch["step"] = jnp.full((len(members),), steps + 2 + step, jnp.int32)
            batches.append(batch)
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for batch in batches:
                trainable, state, kept = compiled.step(trainable, state, batch, seeds, peaks,
                                                       frozen)
            jax.block_until_ready(kept["loss"])
        out["traced_3_steps_ms"] = round(1e3 * (time.perf_counter() - t0), 1)
        out["trace"] = trace_summary(trace_dir)
    return out


def _time_scoring(runner, task: str, data, batches) -> dict:
    from molf_jax.eval import retained_facts
    from molf_jax.experiments.scoring import case_scores

    records = data.val[0] + data.test[0]
    out = {}
    for batch in batches:
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            case_scores(task, runner.eval_model, runner.base_params, runner.tokenizer, records,
                        batch_size=batch)
            runs.append(round(time.perf_counter() - t0, 2))
        out[f"cases_{len(records)}_batch_{batch}_s"] = runs
    for batch in (256, 512):
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            retained_facts(runner.eval_model, runner.base_params, runner.tokenizer,
                           runner.probe(), batch_size=batch)
            runs.append(round(time.perf_counter() - t0, 2))
        out[f"probe_batch_{batch}_s"] = runs
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="an HF folder (the converted Gemma 3 270M)")
    p.add_argument("--tasks", nargs="+", default=["med", "fact", "sql"])
    p.add_argument("--modes", nargs="+", default=["fft", "lora", "molf"])
    p.add_argument("--members", nargs="+", default=["fft=3", "lora=2", "molf=5"],
                   help="K per mode, e.g. fft=3")
    p.add_argument("--remat", default="task",
                   help="rematerialisation: 'task' (the task's first candidate, as the runner "
                        "compiles it) or one of none/full/...")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=4,
                   help="compile the programs again this many at a time (0: skip)")
    p.add_argument("--score-batches", nargs="*",
                   default=["med=256,576", "fact=256,4096", "sql=256,512"],
                   help="rows per scoring pass to time, per task (task=b1,b2); none: skip")
    p.add_argument("--task-options", action="store_true",
                   help="compile with the task's own XLA options (TaskSize.compiler_options), "
                        "as the runner does; without it only XLA_FLAGS apply")
    p.add_argument("--trace", default=None,
                   help="profile three more steps of each program into DIR/<program>")
    p.add_argument("--out", default="bench_sweep.json")
    args = p.parse_args(argv)
    print(use_device_memory(), flush=True)
    from molf_jax.experiments.runner import Runner

    runner = Runner(args.model, "/tmp/bench_sweep_unused", compute_dtype="bfloat16")
    members = {m: int(k) for m, k in (s.split("=") for s in args.members)}
    report = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "device": runner.device,
              "load_seconds": runner.timings["load_seconds"], "tasks": {}}
    work = []
    for task in args.tasks:
        data = runner.task_data(task, "gpu", (0,))
        report["tasks"][task] = {"length": data.length, "programs": {}}
        for program, k in _programs(runner, task, args.modes, members, data):
            work.append((task, data, program, k))
    # Alone: one compile at a time.
    def remat_of(data) -> str:
        return (data.size.remat or ("none",))[0] if args.remat == "task" else args.remat

    compiled = {}
    for task, data, program, k in work:
        built, mems, iterators = _build(runner, program, data, k, remat_of(data))
        t0 = time.perf_counter()
        built.compile(dict(data.size.compiler_options) if args.task_options else None)
        seconds = round(time.perf_counter() - t0, 1)
        compiled[program.name] = (built, mems, iterators)
        report["tasks"][task]["programs"][program.name] = {"members": k, "remat": remat_of(data),
                                                           "compile_alone_s": seconds}
        print(f"{program.name}: K={k} compiled alone in {seconds} s", flush=True)
    if args.threads:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(lambda w: _build(runner, w[2], w[1], w[3],
                                            remat_of(w[1]))[0].compile(
                                                dict(w[1].size.compiler_options)
                                                if args.task_options else None), work))
        report["compile_all_threads_s"] = round(time.perf_counter() - t0, 1)
        report["compile_all_alone_s"] = round(sum(
            p["compile_alone_s"] for t in report["tasks"].values()
            for p in t["programs"].values()), 1)
        print(f"all {len(work)} again in {args.threads} threads: "
              f"{report['compile_all_threads_s']} s (alone: {report['compile_all_alone_s']} s)",
              flush=True)
    for task, data, program, k in work:
        built, mems, iterators = compiled.pop(program.name)
        timing = _time_steps(runner, built, mems, iterators, args.steps,
                             os.path.join(args.trace, program.name) if args.trace else None)
        report["tasks"][task]["programs"][program.name].update(timing)
        print(f"{program.name}: {json.dumps(timing)}", flush=True)
        del built
    score_batches = {t: [int(b) for b in bs.split(",")]
                     for t, bs in (s.split("=") for s in args.score_batches)}
    for task in [t for t in args.tasks if t in score_batches]:
        data = runner.task_data(task, "gpu", (0,))
        scoring = _time_scoring(runner, task, data, score_batches[task])
        report["tasks"][task]["scoring"] = scoring
        print(f"{task} scoring: {scoring}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
