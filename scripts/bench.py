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
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from molf_jax import models
from molf_jax.train import TrainConfig, build_optimizer, is_trainable, make_train_step, split_tree
from molf_jax.train.config import MODES, ROUTED_MODES
from molf_jax.train.loss import next_token_loss_sum
from molf_jax.train.step import jit_train_step
from molf_jax.train.mesh import batch_sharding, make_mesh, on_mesh, param_sharding
from molf_jax.train.modes import lora_spec
from molf_jax.train.setup import target_linears
from molf_jax.train.trees import count_params
from molf_jax.lora import add_lora_experts

PEAK_FLOPS = 790e12  # bf16 matrix product measured on an H200 here (DESIGN.md section 4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-1.5b")
    p.add_argument("--mode", default="molf", choices=MODES)
    p.add_argument("--layers", type=int, default=None,
                   help="override the preset's layer count (smoke tests)")
    p.add_argument("--lora-ranks", type=int, nargs="+", default=None)
    p.add_argument("--train-embeddings-norms", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--param-dtype", default="bfloat16")
    p.add_argument("--state-dtype", default="bfloat16")
    p.add_argument("--remat", default="full")
    p.add_argument("--no-scan", dest="scan", action="store_false")
    p.add_argument("--attention", choices=("cudnn", "xla"),
                   default="cudnn" if jax.default_backend() == "gpu" else "xla")
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


def run_name(args) -> str:
    return f"{args.model}_{args.mode}_{args.tag or 'default'}_{jax.device_count()}dev"


def dump_memory(compiled, args, directory: str) -> None:
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
              "length": args.length, "remat": args.remat, "loss_chunk": args.loss_chunk,
              "attention": args.attention, "jax": jax.__version__, **figures,
              "peak_estimate_gib": peak / 2**30}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{run_name(args)}_memory.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def timed(fn, *args, repeat):
    """Median wall time of fn(*args) with a device sync, after one untimed call."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def setup(args):
    """What the step is made of, before any array exists: the train config, the mesh, the model
    config, the LoRA spec, ``build(attention, remat)`` for the model, ``initial_params()`` (placed
    on the mesh) and the optimizer. scripts/collectives.py compiles the same step on abstract
    arrays."""
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
    config = TrainConfig(mode=args.mode, model=args.model, batch_size=args.batch,
                         lora_ranks=tuple(args.lora_ranks) if args.lora_ranks else None,
                         train_embeddings_norms=args.train_embeddings_norms,
                         param_dtype=args.param_dtype, state_dtype=args.state_dtype,
                         compute_dtype="bfloat16", remat=args.remat, scan_layers=args.scan,
                         loss_chunk=args.loss_chunk, mesh=args.mesh, lora_dropout=0.0,
                         merged_lora=args.merged_lora)
    mesh = make_mesh(config.mesh)
    overrides = {} if args.layers is None else {"num_layers": args.layers, "layer_types": ()}
    model_config = models.preset(args.model, **overrides)
    spec = lora_spec(config)

    def build(attention, remat, merged=True, float32=False):
        """The model; ``merged=False`` keeps the factored LoRA products whatever the spec says,
        ``float32`` computes and stores parameters in float32."""
        lora = spec if spec is None or merged else dataclasses.replace(spec, merged=False)
        return models.build_model(model_config, lora=lora, scan_layers=args.scan, remat=remat,
                                  dtype=jnp.float32 if float32 else jnp.bfloat16,
                                  param_dtype=jnp.float32 if float32 else dtype[args.param_dtype],
                                  attention_impl=attention)

    rule = param_sharding(mesh)
    base_model = models.build_model(model_config, scan_layers=args.scan,
                                    param_dtype=dtype[args.param_dtype])
    shardings = jax.tree.map(lambda x: rule("", x.shape), models.abstract_params(base_model))

    def initial_params():
        params = jax.jit(lambda k: models.init_params(base_model, k),
                         out_shardings=shardings)(jax.random.key(0))
        if spec is None:
            return params
        params = add_lora_experts(params, spec, jax.random.key(1))
        # Nonzero B so that every expert shapes the loss as after a few steps of training.
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 1e-3 if str(getattr(p[-1], "key", "")) == "b" else x, params)
        return jax.tree.map(lambda x: jax.device_put(x, rule("", x.shape)), params)

    tx, _ = build_optimizer(config.replace(mode="fft") if args.unrouted_optimizer else config,
                            total_steps=1000)
    return config, mesh, model_config, spec, build, initial_params, tx


def make_batch(args, vocab_size, mesh):
    """Random token rows ``[1, batch, length]``, all real and all targets, split over the mesh."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, (1, args.batch, args.length), dtype=np.int32)
    sharding = batch_sharding(mesh)
    return {"input_ids": jax.device_put(ids, sharding),
            "attention_mask": jax.device_put(np.ones_like(ids), sharding),
            "loss_mask": jax.device_put(np.ones_like(ids), sharding),
            "step": np.int32(0)}


def train_step(args, model, tx, trainable_fn, params, opt_state):
    """The timed step: jitted, donating, keeping the shardings of ``params`` and ``opt_state``."""
    return jit_train_step(make_train_step(model, tx, trainable=trainable_fn, dropout=False,
                                          loss_chunk=args.loss_chunk, return_routing=False),
                          params, opt_state)


def float32_loss(args, model_config, build, params, batch) -> float:
    """The first step's loss in float32 (params, compute, factored LoRA): the value that the
    bf16 runs round differently."""
    model = build("xla", "none", merged=False, float32=True)

    @jax.jit
    def loss(params, ids, mask, loss_mask):
        params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
        total, count = next_token_loss_sum(hidden, models.output_kernel(params, model_config),
                                           ids, loss_mask, chunk=args.loss_chunk,
                                           softcap=getattr(model_config,
                                                           "final_logit_softcapping", None))
        return total / count

    return float(loss(params, batch["input_ids"][0], batch["attention_mask"][0],
                      batch["loss_mask"][0]))


def main(argv=None):
    args = parse_args(argv)
    config, mesh, model_config, spec, build, initial_params, tx = setup(args)
    model = build(args.attention, args.remat)
    params = initial_params()
    trainable_fn = is_trainable(config, target_linears(params) if spec else set())
    trainable, frozen = split_tree(params, trainable_fn)
    opt_state = on_mesh(jax.jit(tx.init)(trainable), mesh)
    fresh_opt_state = jax.jit(tx.init)
    batch = make_batch(args, model_config.vocab_size, mesh)
    step = train_step(args, model, tx, trainable_fn, params, opt_state)
    compile_start = time.perf_counter()
    if args.dump_memory:
        step = step.lower(params, opt_state, batch).compile()
        dump_memory(step, args, args.dump_memory)
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

    # The optimizer alone, and plain AdamW on the same leaves, on gradient-like trees.
    trainable, frozen = split_tree(params, trainable_fn)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")  # the training steps' peak
    grads = jax.tree.map(lambda x: (x * 1e-3).astype(x.dtype), trainable)

    def opt_time(optimizer):
        state = on_mesh(jax.jit(optimizer.init)(trainable), mesh)  # laid out as in the step

        @jax.jit
        def update(p, s, g):
            u, s = optimizer.update(g, s, p)
            return jax.tree.map(lambda a, b: a + b, p, u), s

        return timed(update, trainable, state, grads, repeat=args.steps)[0]

    optimizer_s = opt_time(tx)
    routing_s = None
    if args.mode in ROUTED_MODES:
        plain_tx, _ = build_optimizer(config.replace(mode="fft"), total_steps=1000)
        routing_s = optimizer_s - opt_time(plain_tx)
    n_params, n_train = count_params(params), count_params(trainable)

    first_loss_plain = first_loss_float32 = None
    if args.check:
        del params, opt_state, trainable, frozen, grads
        params = initial_params()
        state = fresh_opt_state(split_tree(params, trainable_fn)[0])
        plain = jax.jit(make_train_step(build("xla", "none", merged=False), tx, trainable=trainable_fn,
                                        dropout=False, loss_chunk=args.loss_chunk,
                                        return_routing=False))
        first_loss_plain = float(plain(params, state, batch)[2]["loss"])
        first_loss_float32 = float32_loss(args, model_config, build, params, batch)
    tokens = args.batch * args.length
    # Model FLOPs: forward 2N per token; backward 2N for activations plus 2N_trainable for
    # weight gradients; attention scores and values (causal: half) likewise.
    attn = 2 * model_config.num_layers * args.length * model_config.num_heads * \
        model_config.head_dim
    flops_per_token = 4 * n_params + 2 * n_train + 3 * attn
    result = {
        "model": args.model, "mode": args.mode, "tag": args.tag,
        "unrouted_optimizer": args.unrouted_optimizer,
        "merged_lora": bool(spec and spec.merged),
        "ranks": list(config.ranks), "batch": args.batch, "length": args.length,
        "param_dtype": args.param_dtype, "state_dtype": args.state_dtype,
        "remat": args.remat, "scan_layers": args.scan, "attention": args.attention,
        "loss_chunk": args.loss_chunk,
        "train_embeddings_norms": args.train_embeddings_norms,
        "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
        "mesh": dict(mesh.shape), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
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


if __name__ == "__main__":
    main()
