"""The ``molf-jax train`` subcommand: flags with the paper's hyperparameter names."""

from __future__ import annotations

import argparse
import dataclasses

from molf_jax.train.config import MODES, REMAT, SCHEDULES, SCORES, TrainConfig

_DEFAULTS = TrainConfig()


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``train`` to a CLI's subparsers (``func=main``)."""
    p = subparsers.add_parser(
        "train", help="fine-tune with fft, lora, molf, molfe or molf_gate",
        description="With no arguments: MoLF on the embedded Gemma 3 270M, offline Fact task, "
                    "evaluated before and after (about 5 minutes on a 2-core CPU).")
    d = _DEFAULTS
    g = p.add_argument_group("run")
    g.add_argument("--mode", default=d.mode, help=f"one of {', '.join(MODES)}")
    g.add_argument("--model", default=d.model,
                   help="'default' (embedded Gemma 3 270M), an HF folder, or a preset name "
                        "for a random-init model (e.g. qwen2.5-1.5b)")
    g.add_argument("--task", default=d.task, help="sql, med or fact")
    g.add_argument("--source", default=d.source,
                   help="'offline', a hub dataset name, or a local json/jsonl/parquet/folder")
    g.add_argument("--task-size", type=int, default=d.task_size,
                   help="records the offline generator makes")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--out-dir", default=d.out_dir)
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir")

    g = p.add_argument_group("LoRA experts")
    g.add_argument("--lora-ranks", type=int, nargs="+", default=None,
                   help="ranks (default: lora 32, molf and molf_gate 128, molfe 16 128)")
    g.add_argument("--lora-alpha", type=float, nargs="+", default=None,
                   help="one alpha, or one per rank (default 16)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    g.add_argument("--no-rslora", dest="rslora", action="store_false",
                   help="scale by alpha/r instead of alpha/sqrt(r)")
    g.add_argument("--lora-targets", nargs="+", default=list(d.lora_targets),
                   help="module names or regular expressions over module paths")

    g = p.add_argument_group("optimizer and routing")
    g.add_argument("--fft-lr", type=float, default=d.fft_lr)
    g.add_argument("--lora-lr", type=float, default=d.lora_lr)
    g.add_argument("--fft-weight-decay", type=float, default=d.fft_weight_decay)
    g.add_argument("--lora-weight-decay", type=float, default=d.lora_weight_decay)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--score", default=d.score, help=f"one of {', '.join(SCORES)}")
    g.add_argument("--train-embeddings-norms", action="store_true",
                   help="molfe: also train embeddings, norms and non-target params (the "
                        "authors' default; ours keeps them frozen)")
    g.add_argument("--schedule", default=d.schedule, help=f"one of {', '.join(SCHEDULES)}")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)

    g = p.add_argument_group("batches and length")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides epochs)")
    g.add_argument("--max-length", type=int, default=d.max_length)
    g.add_argument("--overflow", default=d.overflow, choices=("drop", "truncate_left"),
                   help="examples longer than --max-length: drop (counted) or cut the prompt "
                        "from the left")

    g = p.add_argument_group("numerics and devices")
    g.add_argument("--param-dtype", default=d.param_dtype, choices=("float32", "bfloat16"))
    g.add_argument("--state-dtype", default=d.state_dtype, choices=("float32", "bfloat16"))
    g.add_argument("--compute-dtype", default=d.compute_dtype, choices=("float32", "bfloat16"))
    g.add_argument("--remat", default=d.remat, help=f"one of {', '.join(REMAT)}")
    g.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                   help="unroll the layers (default: one scanned block, faster to compile)")
    g.add_argument("--loss-chunk", type=int, default=d.loss_chunk)
    g.add_argument("--no-merged-lora", dest="merged_lora", action="store_false",
                   help="molf/molf_gate: keep the factored LoRA products in training steps")
    g.add_argument("--mesh", default=d.mesh, help="axis sizes, e.g. data=1,fsdp=-1,tensor=1")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help="checkpoint every N optimizer steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--routing-log-every", type=int, default=d.routing_log_every,
                   help="write winners and scores every N steps (0: never)")
    g.add_argument("--tensorboard", action="store_true")
    g.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite,
                   help="stop after N non-finite losses in a row (each skips its step)")
    g.add_argument("--no-eval", dest="eval_before_after", action="store_false")
    g.add_argument("--eval-limit", type=int, default=d.eval_limit)
    g.add_argument("--no-export", dest="export", action="store_false")
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    for key in ("lora_ranks", "lora_alpha", "lora_targets"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return TrainConfig(**values)


def main(args: argparse.Namespace) -> int:
    from molf_jax.train.loop import train

    train(config_from_args(args))
    return 0
