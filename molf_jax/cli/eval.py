"""The ``molf-jax eval`` subcommand: score an HF-format checkpoint folder on one task.

Example::

    molf-jax eval --model runs/merged --task med --source offline --size 500 \\
        --results results.csv

The folder is loaded with ``molf_jax.checkpoints.load_hf`` (config + params), the model
built with ``molf_jax.models.build_model``, the tokenizer with transformers' ``AutoTokenizer``
from the same folder. Metrics are printed as JSON and, with ``--results``, appended as one row
per metric (model, task, metric, value, n, seconds); the task column reads e.g. ``med`` for the
paper data and ``med-offline`` for the offline twin.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from molf_jax.data import PROTOCOLS, TASKS
from molf_jax.eval._results import check_results_file
from molf_jax.paths import PathError
from molf_jax.train.config import TrainConfig

# The offline cases `molf-jax train` scores before and after training: the same generator size
# and the same first records, so both commands print the same numbers for the same model.
_TRAIN_DEFAULTS = TrainConfig()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``eval`` subcommand (``func=main``) to a CLI's subparsers.

    Example:
      >>> parser = argparse.ArgumentParser()
      >>> _ = register(parser.add_subparsers(dest='command'))
      >>> parser.parse_args(['eval', '--model', 'm', '--task', 'med']).batch_size
      8
    """
    p = subparsers.add_parser(
        "eval", help="score a checkpoint on sql, med or fact and append the results",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="HF-format folder (config + safetensors)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument(
        "--source", default="offline",
        help="'offline' (generated), a hub dataset name, or a local json/jsonl/parquet/folder",
    )
    p.add_argument(
        "--protocol", choices=PROTOCOLS, default=None,
        help="prompts, tokens and scoring: 'authors' (their code's; their metrics, named "
             "authors_*, printed beside ours) or 'molf_jax'; default: authors for paper data, "
             "molf_jax for offline tasks",
    )
    p.add_argument("--size", type=int, default=_TRAIN_DEFAULTS.task_size,
                   help="records the offline generator makes (as molf-jax train)")
    p.add_argument("--seed", type=int, default=_TRAIN_DEFAULTS.seed,
                   help="offline generation / split seed")
    p.add_argument("--split", choices=("eval", "train"), default="eval")
    p.add_argument("--limit", type=int, default=_TRAIN_DEFAULTS.eval_limit,
                   help="score only the first N records (the cases molf-jax train scores; "
                        "0: all)")
    p.add_argument("--cop-base", type=int, default=0, help="MedMCQA 'cop' index base")
    p.add_argument("--no-sql-context", action="store_true", help="SQL prompts without schema")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (None: 256 for sql, 8 for med)")
    p.add_argument("--results", default=None, help="CSV or JSONL file to append rows to")
    p.add_argument("--name", default=None,
                   help="model name in result rows (None: the folder's name)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Runs the evaluation described by parsed ``args``; returns the exit status."""
    from transformers import AutoTokenizer

    from molf_jax.checkpoints import load_hf
    from molf_jax.data import load_task
    from molf_jax.eval import evaluate_task, paper_comparison, report_metrics
    from molf_jax.models import build_model

    check_args(args)
    data = load_task(args.task, args.source, size=args.size, seed=args.seed,
                     cop_base=args.cop_base, protocol=args.protocol)
    records = data.eval if args.split == "eval" else data.train
    if args.limit:
        records = records[: args.limit]
    _say(f"eval: {len(records)} {args.task} cases ({args.split} split of {args.source}"
         f"{f', {args.size} generated, seed {args.seed}' if args.source == 'offline' else ''})"
         f" on {args.model}")
    config, params = load_hf(args.model)
    model = build_model(config)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    start = time.perf_counter()
    metrics = evaluate_task(
        args.task, model, params, tokenizer, records, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, sql_with_context=not args.no_sql_context,
        protocol=data.protocol,
    )
    seconds = time.perf_counter() - start

    name = args.name or os.path.basename(os.path.normpath(args.model))
    task = f"{args.task}-offline" if args.source == "offline" else args.task
    report_metrics(name, task, metrics, seconds, args.results)
    comparison = paper_comparison(args.task, metrics)
    if comparison:
        print(comparison)
    _say(f"{task} on {name} in {seconds:.0f} s:")
    for metric, result in metrics.items():
        if isinstance(result, dict) and "value" in result:
            _say(f"  {metric:<14} {result['value']:.4f}  (n {result.get('n')})")
    return 0


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before anything is loaded or scored; one message per problem.

    Raises:
      ValueError (`molf_jax.paths.PathError` for paths): the message names the flag.
    """
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--size", args.size, 1),
                               ("--limit", args.limit, 0),
                               ("--max-new-tokens", args.max_new_tokens, 1)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be >= {least}, got {value}")
    if args.cop_base not in (0, 1):
        raise ValueError(f"--cop-base must be 0 or 1, got {args.cop_base}")
    model = Path(args.model)
    if not model.exists():
        raise PathError(f"--model {model}: no such folder")
    if not model.is_dir():
        hint = (" (a GGUF file: convert it first with molf_jax.checkpoints.convert_gguf_to_hf)"
                if model.suffix.lower() == ".gguf" else "")
        raise PathError(f"--model {model}: is a file; give a Hugging Face folder (config.json "
                        f"and *.safetensors), e.g. runs/molf/merged{hint}")
    if not (model / "config.json").is_file():
        raise PathError(f"--model {model}: no config.json; give a Hugging Face folder, e.g. "
                        "runs/molf/merged")
    if args.results:
        check_results_file(args.results)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
