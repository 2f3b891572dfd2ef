"""The ``molf-jax eval`` subcommand: score an HF-format checkpoint folder on one task.

Example::

    molf-jax eval --model runs/merged --task med --source offline --size 500 \\
        --results results.csv

Given a run directory, or the ``merged/`` folder inside one, it scores that run's merged model
on the cases the run trained and evaluated on: task, source, protocol, generator size, seed and
``--eval-limit`` come from the run's ``run_config.json`` unless a flag names them::

    molf-jax eval --model runs/molf          # = --model runs/molf/merged, the run's own cases

The folder is loaded with ``molf_jax.checkpoints.load_hf`` (config + params), the model
built with ``molf_jax.models.build_model``, the tokenizer with transformers' ``AutoTokenizer``
from the same folder. Metrics are printed as JSON and, with ``--results``, appended as one row
per metric (model, task, metric, value, n, seconds); the task column reads e.g. ``med`` for the
paper data and ``med-offline`` for the offline twin.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from molf_jax.data import PROTOCOLS, TASKS
from molf_jax.eval._results import check_results_file
from molf_jax.options import add_arguments, from_arguments, option
from molf_jax.paths import PathError
from molf_jax.run_dir import RunDir
from molf_jax.train.config import TrainConfig

# The offline cases `molf-jax train` scores before and after training: the same generator size
# and the same first records, so both commands print the same numbers for the same model.
_TRAIN_DEFAULTS = TrainConfig()


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """What ``molf-jax eval`` scores and where the rows go: one flag per field."""

    model: str = option(None, "HF-format folder (config + safetensors), or a run directory "
                        "(its merged/ folder is scored)", required=True)
    task: str | None = option(None, "the task to score", choices=TASKS,
                              default_text="the run's; required for a folder outside a run")
    source: str | None = option(None, "'offline' (generated), a hub dataset name, or a local "
                                "json/jsonl/parquet/folder", default_text=f"the run's, else "
                                f"{_TRAIN_DEFAULTS.source}")
    protocol: str | None = option(
        None, "prompts, tokens and scoring: 'authors' (their code's; their metrics, named "
        "authors_*, printed beside ours) or 'molf_jax'", choices=PROTOCOLS,
        default_text="the run's, else molf_jax; authors only when asked for")
    size: int | None = option(None, "records the offline generator makes (as molf-jax train)",
                              default_text=f"the run's --task-size, else "
                              f"{_TRAIN_DEFAULTS.task_size}")
    seed: int | None = option(None, "offline generation / split seed",
                              default_text=f"the run's, else {_TRAIN_DEFAULTS.seed}")
    split: str = option("eval", "which split to score", choices=("eval", "train"))
    limit: int | None = option(None, "score only the first N records (the cases molf-jax "
                               "train scores; 0: all)", default_text=f"the run's --eval-limit, "
                               f"else {_TRAIN_DEFAULTS.eval_limit}")
    cop_base: int = option(0, "MedMCQA 'cop' index base")
    no_sql_context: bool = option(False, "SQL prompts without schema")
    batch_size: int = option(8, "prompts per batch")
    max_new_tokens: int | None = option(None, "generation budget",
                                        default_text="256 for sql, 8 for med")
    results: str | None = option(None, "CSV or JSONL file to append rows to")
    name: str | None = option(None, "model name in result rows",
                              default_text="the run directory's name, else the folder's")


# The eval options a run directory fills in, from the TrainConfig fields of its run_config.json.
_FROM_RUN = {"task": "task", "source": "source", "protocol": "protocol", "size": "task_size",
             "seed": "seed", "limit": "eval_limit"}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``eval`` subcommand (``func=main``) to a CLI's subparsers, one flag per
    `EvalOptions` field.

    Example:
      >>> parser = argparse.ArgumentParser()
      >>> _ = register(parser.add_subparsers(dest='command'))
      >>> parser.parse_args(['eval', '--model', 'm', '--task', 'med']).batch_size
      8
    """
    p = subparsers.add_parser(
        "eval", help="score a checkpoint on sql, med or fact and append the results")
    add_arguments(p, EvalOptions, check_choices=True)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Runs the evaluation described by parsed ``args``; returns the exit status."""
    args, run = with_run_defaults(from_arguments(EvalOptions, args))
    from transformers import AutoTokenizer

    from molf_jax.checkpoints import load_hf
    from molf_jax.checkpoints.hf import check_tokenizer_files
    from molf_jax.data import load_task
    from molf_jax.eval import evaluate_task, paper_comparison, report_metrics
    from molf_jax.models import build_model

    check_args(args)
    data = load_task(args.task, args.source, size=args.size, seed=args.seed,
                     cop_base=args.cop_base, protocol=args.protocol)
    records = data.eval if args.split == "eval" else data.train
    if args.limit:
        records = records[: args.limit]
    if run is not None:
        _say(f"eval: the cases of the run {run.path} (task {args.task}, source {args.source}, "
             f"protocol {data.protocol}, size {args.size}, seed {args.seed}, limit {args.limit}"
             f"; flags override them)")
    _say(f"eval: {len(records)} {args.task} cases ({args.split} split of {args.source}"
         f"{f', {args.size} generated, seed {args.seed}' if args.source == 'offline' else ''})"
         f" on {args.model}")
    check_tokenizer_files(args.model)
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

    name = args.name or os.path.basename(os.path.normpath(run.path if run else args.model))
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


def with_run_defaults(args: EvalOptions) -> tuple[EvalOptions, RunDir | None]:
    """``args`` with ``--model`` pointing at a run's merged folder and every option left unset
    taken from that run's ``run_config.json`` (the run itself is returned too), or, for a
    folder outside a run, from `molf-jax train`'s defaults.

    Raises:
      ValueError (`molf_jax.paths.PathError` for paths): the message names the flag.

    Example:
      >>> args, run = with_run_defaults(EvalOptions(model='m', task='med'))  # not a run
      >>> (args.source, args.size, run)
      ('offline', 48, None)
    """
    model = Path(args.model)
    run = None
    if RunDir(model).config.is_file():
        run = RunDir(model)
        if not run.merged.is_dir():
            raise PathError(f"--model {model}: a run directory without {run.merged.name}/; "
                            f"write it with: molf-jax export {model}")
        args = dataclasses.replace(args, model=str(run.merged))
    elif model.name == RunDir(model.parent).merged.name and RunDir(model.parent).config.is_file():
        run = RunDir(model.parent)
    if run is not None:
        try:
            trained = json.loads(run.config.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--model {args.model}: cannot read {run.config}: {err}") from err
        fallback = {name: trained.get(field, getattr(_TRAIN_DEFAULTS, field))
                    for name, field in _FROM_RUN.items()}
    else:
        # Outside a run there is no task to fall back on: --task must name it.
        fallback = {name: getattr(_TRAIN_DEFAULTS, field) for name, field in _FROM_RUN.items()
                    if name != "task"}
        fallback["task"] = None
    unset = {name: fallback[name] for name in _FROM_RUN if getattr(args, name) is None}
    args = dataclasses.replace(args, **unset)
    if args.task is None:
        raise ValueError(f"--task is required: --model {args.model} is not a run directory "
                         "or its merged folder (whose run_config.json names the task)")
    return args, run


def check_args(args: EvalOptions) -> None:
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
