"""Times training steps of fft / lora / molf / molfe on random-init models of the paper's shapes.

Reports the median step time over --steps timed steps after --warmup, the optimizer's share of
the step (the optimizer update timed alone on the same trees), the routing overhead (MoLF's
optimizer minus plain AdamW on the same leaves), tokens/s, peak device memory, and model FLOPs
utilisation against 790 TFLOP/s (bf16 matrix rate measured on an H200). One JSON per run goes
to --out (default bench_results/). Also checks that the first step's loss equals the same step
without the speed options (XLA attention, no remat, factored LoRA products), and records the
same loss in float32.

Example (one H200):
  python scripts/bench.py --model qwen2.5-1.5b --mode molf --batch 8 --length 512
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from molf_jax import models
from molf_jax.train import (ATTENTION, DTYPES, MODES, PLATFORM_DEFAULTS, REMAT, ModelSource, Run,
                            RunPlan, TrainConfig, assemble_run, batch_sharding, build_optimizer,
                            count_params, lora_spec, on_mesh, param_sharding, plan_run,
                            resolve_config, split_trainable, training_model, training_step)
from molf_jax.adalora import AdaLoraSpec
from molf_jax.device_memory import MEMORY_FRACTION_VARIABLE, use_device_memory

# bf16 matrix product measured on an H200 here (docs/design.md section 4).
PEAK_FLOPS = 790e12
# The random base model and its adapters.
KEYS = (jax.random.key(0), jax.random.key(1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-1.5b")
    p.add_argument("--mode", default="molf", choices=tuple(MODES))
    p.add_argument("--layers", type=int, default=None,
                   help="override the preset's layer count (smoke tests)")
    p.add_argument("--lora-ranks", type=int, nargs="+", default=None)
    p.add_argument("--train-embeddings-norms", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    # Numerics and kernels: `molf-jax train`'s flags and defaults (the platform's).
    p.add_argument("--param-dtype", default=None, choices=DTYPES)
    p.add_argument("--state-dtype", default=None, choices=DTYPES)
    p.add_argument("--compute-dtype", default=None, choices=DTYPES)
    p.add_argument("--remat", default=None, choices=REMAT)
    p.add_argument("--attention", default=None, choices=ATTENTION)
    p.add_argument("--numerics-of", default=None, choices=tuple(PLATFORM_DEFAULTS),
                   help="take this platform's defaults instead of the running one's "
                        "(scripts/collectives.py builds the GPU step on CPU devices)")
    p.add_argument("--no-scan", dest="scan", action="store_false")
    p.add_argument("--loss-chunk", type=int, default=2048)
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    p.add_argument("--no-merged-lora", dest="merged_lora", action="store_false",
                   help="ablation: molf with the factored LoRA products (TrainConfig.merged_lora)")
    p.add_argument("--unrouted-optimizer", action="store_true",
                   help="ablation: molf/molfe params, but plain AdamW (no routing)")
    p.add_argument("--tag", default="")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the first-step loss check against the plain configuration")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--dump-memory", metavar="DIR", default=None,
                   help="also write the train step's compiled memory_analysis() as JSON to DIR")
    return p.parse_args(argv)


def bench_config(args) -> TrainConfig:
    """The training configuration this benchmark times, as given (`setup` plans it with the
    ``--numerics-of`` platform). ``molf-jax train`` given the same settings (``--model M
    --mode X --batch-size B --max-length T --lora-dropout 0 ...``) builds the same step from it
    (tests/test_bench.py)."""
    config = TrainConfig(mode=args.mode, model=args.model, batch_size=args.batch,
                         max_length=args.length,
                         lora_ranks=tuple(args.lora_ranks) if args.lora_ranks else None,
                         train_embeddings_norms=args.train_embeddings_norms,
                         param_dtype=args.param_dtype, state_dtype=args.state_dtype,
                         compute_dtype=args.compute_dtype, remat=args.remat,
                         attention=args.attention, scan_layers=args.scan,
                         loss_chunk=args.loss_chunk, mesh=args.mesh, lora_dropout=0.0,
                         merged_lora=args.merged_lora)
    return config


def run_name(args) -> str:
    return f"{args.model}_{args.mode}_{args.tag or 'default'}_{jax.device_count()}dev"


def dump_memory(compiled, args, config, directory: str) -> None:
    """Writes XLA's buffer sizes for the compiled step (bytes; peak = args + temp + out - alias)."""
    stats = compiled.memory_analysis()
    if stats is None:
        print(f"--dump-memory: backend {jax.default_backend()} gives no memory analysis")
        return
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    figures = {f: int(getattr(stats, f)) for f in fields if hasattr(stats, f)}
    peak = (figures["argument_size_in_bytes"] + figures["output_size_in_bytes"]
            - figures["alias_size_in_bytes"] + figures["temp_size_in_bytes"])
    record = {"model": args.model, "mode": args.mode, "tag": args.tag,
              "unrouted_optimizer": args.unrouted_optimizer, "batch": args.batch,
              "length": args.length, "remat": config.remat, "loss_chunk": args.loss_chunk,
              "attention": config.attention, "jax": jax.__version__, **figures,
              "peak_estimate_gib": peak / 2**30}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{run_name(args)}_memory.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def time_optimizer(optimizer, params, state, grads, *, repeat):
    """Median wall time of one optimizer update and its application, on ``params`` and
    ``state`` themselves: both are donated and come back updated, so no second optimizer state
    is ever alive (at Qwen2.5-7B a second one did not fit beside the first).

    Returns ``(seconds, params, state)``."""
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(p, s, g):
        u, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, u), s

    params, state = jax.block_until_ready(update(params, state, grads))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        params, state = jax.block_until_ready(update(params, state, grads))
        times.append(time.perf_counter() - start)
    return statistics.median(times), params, state


class Bench(NamedTuple):
    """What the timed step is made of, before any array exists.

    Attributes:
      plan: the planned run (`molf_jax.train.plan_run` of `bench_config`).
      run: the run assembled on abstract params (`molf_jax.train.assemble_run`): model source,
        LoRA experts, parameter roles.
      initial_params: ``() -> params`` placed on the mesh: the same assembly with arrays.
      tx: the optimizer (plain AdamW with ``--unrouted-optimizer``).
      plain_tx: plain AdamW on the same leaves (the fft mode's optimizer), the routing
        overhead's reference.
    """

    plan: RunPlan
    run: Run
    initial_params: Callable[[], Any]
    tx: optax.GradientTransformation
    plain_tx: optax.GradientTransformation

    config = property(lambda self: self.plan.config, doc="the resolved training config")
    mesh = property(lambda self: self.plan.mesh)
    model_config = property(lambda self: self.run.source.config)
    spec = property(lambda self: self.run.lora)
    roles = property(lambda self: self.run.roles)

    def model(self, **changes):
        """The training model of ``config.replace(**changes)`` (`training_model`)."""
        config = self.config.replace(**changes)
        return training_model(config, self.model_config, lora_spec(config))


def setup(args) -> Bench:
    """The benchmark's `Bench`, assembled by the trainer's `assemble_run` on a random-init model
    of the preset's shape; scripts/collectives.py compiles the same step on abstract arrays."""
    given = bench_config(args)
    plan = plan_run(given, platform=args.numerics_of)
    overrides = {} if args.layers is None else {"num_layers": args.layers, "layer_types": ()}
    source = ModelSource(args.model, None, models.preset(args.model, **overrides))
    run = assemble_run(plan, source=source, keys=KEYS, abstract=True)
    rule = param_sharding(plan.mesh)

    def initial_params():
        params = assemble_run(plan, source=source, keys=KEYS).params
        if run.lora is None:
            return params
        # Nonzero B (AdaLoRA: E) so that every expert shapes the loss as after a few steps.
        moved = "e" if isinstance(run.lora, AdaLoraSpec) else "b"
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 1e-3 if str(getattr(p[-1], "key", "")) == moved else x, params)
        return jax.tree.map(lambda x: jax.device_put(x, rule("", x.shape)), params)

    plain_tx, _ = build_optimizer(resolve_config(given.replace(mode="fft"), args.numerics_of),
                                  total_steps=1000, roles=run.roles)
    tx = plain_tx if args.unrouted_optimizer else build_optimizer(
        plan.config, total_steps=1000, roles=run.roles)[0]
    return Bench(plan, run, initial_params, tx, plain_tx)


def make_batch(args, vocab_size, mesh):
    """Random token rows ``[1, batch, length]``, all real and all targets, split over the mesh."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, (1, args.batch, args.length), dtype=np.int32)
    sharding = batch_sharding(mesh)
    return {"input_ids": jax.device_put(ids, sharding),
            "attention_mask": jax.device_put(np.ones_like(ids), sharding),
            "loss_mask": jax.device_put(np.ones_like(ids), sharding),
            "step": np.int32(0)}


def train_step(bench: Bench, model, params, opt_state):
    """The timed step: the trainer's (`training_step`), jitted, donating, keeping the shardings
    of ``params`` and ``opt_state``."""
    return training_step(bench.config, model, bench.tx, bench.roles, params, opt_state)


def float32_loss(bench: Bench, params, batch) -> float:
    """The first step's loss in float32 (params, compute, factored LoRA): the value that the
    bf16 runs round differently."""
    config = bench.config
    model = bench.model(attention="xla", remat="none", merged_lora=False,
                        param_dtype="float32", compute_dtype="float32")

    @jax.jit
    def loss(params, ids, mask, loss_mask):
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        total, count = models.next_token_loss(model, params, ids, mask, loss_mask,
                                              chunk=config.loss_chunk)
        return total / count

    return float(loss(params, batch["input_ids"][0], batch["attention_mask"][0],
                      batch["loss_mask"][0]))


def main(argv=None):
    print(use_device_memory(), flush=True)  # before setup() starts JAX's backend
    args = parse_args(argv)
    bench = setup(args)
    config, mesh, model_config = bench.config, bench.mesh, bench.model_config
    print(f"benchmarking {json.dumps(config.to_dict())}")
    model = bench.model()
    params = bench.initial_params()
    trainable, _ = split_trainable(params, bench.roles)
    opt_state = on_mesh(jax.jit(bench.tx.init)(trainable), mesh)
    batch = make_batch(args, model_config.vocab_size, mesh)
    step = train_step(bench, model, params, opt_state)
    compile_start = time.perf_counter()
    if args.dump_memory:
        step = step.lower(params, opt_state, batch).compile()
        dump_memory(step, args, config, args.dump_memory)
    params, opt_state, metrics = step(params, opt_state, batch)
    first_loss = float(metrics["loss"])
    compile_s = time.perf_counter() - compile_start
    for _ in range(args.warmup - 1):
        params, opt_state, metrics = step(params, opt_state, batch)
    jax.block_until_ready(params)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        params, opt_state, metrics = step(params, opt_state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")  # the training steps' peak

    # The optimizer alone on the training state, then plain AdamW on the same leaves in place
    # of it, on gradient-like trees.
    n_params = count_params(params)
    trainable, _ = split_trainable(params, bench.roles)
    del params, metrics
    n_train = count_params(trainable)
    grads = jax.tree.map(lambda x: (x * 1e-3).astype(x.dtype), trainable)
    optimizer_s, trainable, opt_state = time_optimizer(bench.tx, trainable, opt_state, grads,
                                                       repeat=args.steps)
    routing_s = None
    mode = bench.plan.mode
    if mode.routes or mode.adapter == "adalora":  # adalora: the rank allocator's overhead
        del opt_state
        plain_tx = bench.plain_tx
        plain_state = on_mesh(jax.jit(plain_tx.init)(trainable), mesh)
        plain_s, trainable, plain_state = time_optimizer(plain_tx, trainable, plain_state, grads,
                                                         repeat=args.steps)
        routing_s = optimizer_s - plain_s
        del plain_state
    else:
        del opt_state
    del trainable, grads

    first_loss_plain = first_loss_float32 = None
    if args.check:
        params = bench.initial_params()
        first_loss_float32 = float32_loss(bench, params, batch)
        state = on_mesh(jax.jit(bench.tx.init)(split_trainable(params, bench.roles)[0]), mesh)
        plain = train_step(bench, bench.model(attention="xla", remat="none", merged_lora=False),
                           params, state)
        first_loss_plain = float(plain(params, state, batch)[2]["loss"])
    tokens = args.batch * args.length
    # Model FLOPs: forward 2N per token; backward 2N for activations plus 2N_trainable for
    # weight gradients; attention scores and values (causal: half) likewise.
    attn = 2 * model_config.num_layers * args.length * model_config.num_heads * \
        model_config.head_dim
    flops_per_token = 4 * n_params + 2 * n_train + 3 * attn
    result = {
        "model": args.model, "mode": args.mode, "tag": args.tag,
        "unrouted_optimizer": args.unrouted_optimizer,
        "merged_lora": bool(getattr(bench.spec, "merged", False)),
        "ranks": list(config.ranks), "batch": args.batch, "length": args.length,
        "param_dtype": config.param_dtype, "state_dtype": config.state_dtype,
        "compute_dtype": config.compute_dtype,
        "remat": config.remat, "scan_layers": config.scan_layers, "attention": config.attention,
        "loss_chunk": args.loss_chunk,
        "train_embeddings_norms": args.train_embeddings_norms,
        "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mem_fraction": os.environ.get(MEMORY_FRACTION_VARIABLE),
        "params": n_params, "trainable_params": n_train,
        "step_s": step_s, "step_s_all": times, "compile_s": compile_s,
        "optimizer_s": optimizer_s, "optimizer_share": optimizer_s / step_s,
        "routing_s": routing_s,
        "routing_share": None if routing_s is None else routing_s / step_s,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_device": tokens / step_s / jax.device_count(),
        "peak_gib": None if peak is None else peak / 2**30,
        "mfu": flops_per_token * tokens / step_s / (PEAK_FLOPS * jax.device_count()),
        "first_loss": first_loss, "first_loss_plain": first_loss_plain,
        "first_loss_float32": first_loss_float32,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{run_name(args)}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "step_s_all"}))

