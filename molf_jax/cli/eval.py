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
import time

from molf_jax.data import PROTOCOLS, TASKS


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``eval`` subcommand (``func=main``) to a CLI's subparsers.

    Example:
      >>> parser = argparse.ArgumentParser()
      >>> _ = register(parser.add_subparsers(dest='command'))
      >>> parser.parse_args(['eval', '--model', 'm', '--task', 'med']).batch_size
      8
    """
    p = subparsers.add_parser(
        "eval", help="score a checkpoint on sql, med or fact and append the results"
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
    p.add_argument("--size", type=int, default=None, help="offline task size (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="offline generation / split seed")
    p.add_argument("--split", choices=("eval", "train"), default="eval")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--cop-base", type=int, default=0, help="MedMCQA 'cop' index base")
    p.add_argument("--no-sql-context", action="store_true", help="SQL prompts without schema")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--results", default=None, help="CSV or JSONL file to append rows to")
    p.add_argument("--name", default=None, help="model name in result rows (default: folder)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Runs the evaluation described by parsed ``args``; returns the exit status."""
    from transformers import AutoTokenizer

    from molf_jax.checkpoints import load_hf
    from molf_jax.data import load_task
    from molf_jax.eval import evaluate_task, paper_comparison, report_metrics
    from molf_jax.models import build_model

    data = load_task(args.task, args.source, size=args.size, seed=args.seed,
                     cop_base=args.cop_base, protocol=args.protocol)
    records = data.eval if args.split == "eval" else data.train
    if args.limit is not None:
        records = records[: args.limit]
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
    return 0
