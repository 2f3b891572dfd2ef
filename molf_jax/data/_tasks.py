"""One entry point for the three tasks: paper data (hub name or local file) or offline data.

Records keep the hub formats (gretelai/synthetic_text_to_sql, openlifescienceai/medmcqa,
CounterFact), so rendering and evaluation never care where a record came from. Rows that cannot
be used are dropped with a count in the log and in :attr:`TaskData.dropped`; missing files,
missing columns and empty splits raise errors naming the file (or split) and column.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
from typing import Any, Callable, Mapping, Sequence

from molf_jax.data import _offline_fact, _offline_mcq, _offline_sql
from molf_jax.data._prompts import OPTION_COLUMNS, TASKS
from molf_jax.data._protocol import AUTHORS, resolve_protocol
from molf_jax.data._sources import read_source

logger = logging.getLogger(__name__)

OFFLINE = "offline"

# Evaluation split to use when the source has one, in order of preference. MedMCQA's hub "test"
# split has no labels (cop = -1), so its "validation" split is the evaluation split (as in the
# paper). CounterFact has a single split and is evaluated on the edited cases themselves.
_EVAL_SPLITS = {
    "sql": ("test", "validation", "eval", "dev"),
    "med": ("validation", "dev", "eval", "test"),
    "fact": (),
}
_REQUIRED_COLUMNS = {
    "sql": ("sql_prompt", "sql_context", "sql"),
    "med": ("question", *OPTION_COLUMNS, "cop"),
    "fact": ("requested_rewrite",),
}
_REWRITE_KEYS = ("prompt", "subject", "target_new", "target_true")


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The records of one task, split into training and evaluation.

    Attributes:
      task: 'sql', 'med' or 'fact'.
      train: training records (hub format dicts).
      eval: evaluation records. For 'fact' these are the training cases themselves (an edit is
        evaluated on the prompts it was trained on, plus paraphrases and neighbours).
      source: where the records came from ('offline' or the hub name/path given).
      dropped: ``"<split>: <reason>" -> count`` of rows dropped while loading.
      protocol: how to render and score them ('authors' or 'molf_jax'; see
        :mod:`molf_jax.data._protocol`): 'molf_jax' unless 'authors' is asked for.
    """

    task: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    source: str
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    protocol: str = "molf_jax"


class _Drops:
    """Counts dropped rows per reason and logs each reason once per split."""

    def __init__(self, where: str):
        self.where = where
        self.counts: dict[str, int] = {}

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def log(self, total: int) -> None:
        for reason, count in self.counts.items():
            logger.warning("%s: dropped %d of %d rows (%s)", self.where, count, total, reason)


def _check_columns(rows: Sequence[dict[str, Any]], required: Sequence[str], where: str) -> None:
    columns = set(rows[0].keys())
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; found columns {sorted(columns)}"
        )


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _clean_sql(rows, where, drops, *, protocol: str = "molf_jax", **_):
    # The authors render a blank schema with their no-context template; ours drops the row.
    needed = ("sql_prompt", "sql") if protocol == AUTHORS else _REQUIRED_COLUMNS["sql"]
    kept = []
    for row in rows:
        blank = [c for c in needed if _blank(row[c])]
        if blank:
            drops.add(f"empty {'/'.join(blank)}")
            continue
        kept.append(dict(row))
    return kept


def _clean_med(rows, where, drops, *, cop_base: int = 0, **_):
    kept, out_of_range = [], []
    for number, row in enumerate(rows, start=1):
        cop = row["cop"]
        if cop is None or cop == -1:
            drops.add("unlabelled: cop is missing or -1")
            continue
        if isinstance(cop, bool) or not isinstance(cop, (int, str)) or \
                isinstance(cop, str) and not cop.strip().lstrip("-").isdigit():
            raise ValueError(f"{where}: row {number}: field cop must be an option index "
                             f"({cop_base}..{cop_base + 3}), got {cop!r:.40}")
        text_columns = ("question", *OPTION_COLUMNS)
        blank = [c for c in text_columns if _blank(row[c])]
        if blank:
            drops.add(f"empty {'/'.join(blank)}")
            continue
        index = int(cop) - cop_base
        if not 0 <= index <= 3:
            out_of_range.append(cop)
            continue
        kept.append({**row, "cop": index})
    if out_of_range:
        hint = (
            " (the hub data is 0-based; the original MedMCQA JSON files are 1-based: pass "
            "cop_base=1)"
            if cop_base == 0 and 4 in out_of_range
            else ""
        )
        raise ValueError(
            f"{where}: column 'cop' has {len(out_of_range)} value(s) outside "
            f"{cop_base}..{cop_base + 3}, e.g. {out_of_range[:3]}{hint}"
        )
    return kept


def _prompt_text(item: Any) -> str:
    # MEMIT's multi_counterfact stores some prompt lists as {"prompt": ..., "target": ...}.
    return item["prompt"] if isinstance(item, dict) else item


def _clean_fact(rows, where, drops, **_):
    for number, row in enumerate(rows, start=1):
        _check_rewrite(row["requested_rewrite"], f"{where}: row {number}")
        for key in ("paraphrase_prompts", "neighborhood_prompts"):
            _check_prompt_list(row.get(key), f"{where}: row {number}: field {key}")
    kept = []
    for row in rows:
        rw = row["requested_rewrite"]
        texts = (rw["prompt"], rw["subject"], (rw["target_new"] or {}).get("str"),
                 (rw["target_true"] or {}).get("str"))
        if any(_blank(t) for t in texts):
            drops.add("empty requested_rewrite field")
            continue
        kept.append(
            {
                **row,
                "paraphrase_prompts": [
                    _prompt_text(p) for p in row.get("paraphrase_prompts") or []
                ],
                "neighborhood_prompts": [
                    _prompt_text(p) for p in row.get("neighborhood_prompts") or []
                ],
            }
        )
    return kept


def _check_rewrite(rewrite: Any, where: str) -> None:
    """One fact row's ``requested_rewrite``: every field present (a missing field reads as None
    once `datasets` unifies the rows) and a prompt with ``{}`` where the subject goes."""
    if not isinstance(rewrite, dict):
        raise ValueError(f"{where}: 'requested_rewrite' must be an object, got {rewrite!r:.80}")
    for key in _REWRITE_KEYS:
        if rewrite.get(key) is None:
            raise ValueError(f"{where}: missing field requested_rewrite.{key}")
    for key in ("target_new", "target_true"):
        if not isinstance(rewrite[key], dict) or rewrite[key].get("str") is None:
            raise ValueError(f"{where}: missing field requested_rewrite.{key}.str")
    for key, value in (("prompt", rewrite["prompt"]), ("subject", rewrite["subject"]),
                       ("target_new.str", rewrite["target_new"]["str"]),
                       ("target_true.str", rewrite["target_true"]["str"])):
        if not isinstance(value, str):
            raise ValueError(f"{where}: field requested_rewrite.{key} must be text, got "
                             f"{value!r:.40}")
    if "{}" not in rewrite["prompt"]:
        raise ValueError(f"{where}: requested_rewrite.prompt {rewrite['prompt']!r} has no '{{}}' "
                         "where the subject goes")


def _check_prompt_list(prompts: Any, where: str) -> None:
    """A list of prompts (text, or ``{"prompt": text}`` as in MEMIT's files), or nothing. A
    single string would otherwise be read as a list of one-character prompts."""
    if prompts is None:
        return
    if not isinstance(prompts, list):
        raise ValueError(f"{where} must be a list of prompts, got {prompts!r:.40}")
    for item in prompts:
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ValueError(f"{where}: every prompt must be text, got {item!r:.40}")


_CLEANERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "sql": _clean_sql,
    "med": _clean_med,
    "fact": _clean_fact,
}


def _clean_split(task, rows, where, split_label, dropped, **options):
    if not rows:
        raise ValueError(f"{where}: split is empty (no rows)")
    _check_columns(rows, _REQUIRED_COLUMNS[task], where)
    drops = _Drops(where)
    kept = _CLEANERS[task](rows, where, drops, **options)
    drops.log(len(rows))
    for reason, count in drops.counts.items():
        dropped[f"{split_label}: {reason}"] = count
    if not kept:
        raise ValueError(f"{where}: no usable rows left after dropping {drops.counts}")
    return kept


def _carve_eval(rows, eval_fraction, seed):
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(rows) < 2:
        raise ValueError(f"cannot split {len(rows)} row(s) into train and eval")
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_fraction)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in eval_ids]
    evals = [r for i, r in enumerate(rows) if i in eval_ids]
    return train, evals


_GENERATORS = {"sql": _offline_sql.generate, "med": _offline_mcq.generate,
               "fact": _offline_fact.generate}


def offline_option_names(task: str) -> tuple[str, ...]:
    """The ``offline_options`` that ``load_task(task, 'offline', ...)`` accepts.

    Example:
      >>> offline_option_names('sql'), offline_option_names('med')
      (('held_out_kinds',), ('known_only',))
    """
    names = inspect.signature(_GENERATORS[task]).parameters
    return tuple(n for n in names if n not in ("size", "eval_size", "seed"))


def _load_offline(task, size, eval_size, seed, options):
    size = 1000 if size is None else size
    allowed = offline_option_names(task)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"offline_options: {unknown} not known for offline {task}; it takes "
                         f"{', '.join(allowed) or 'none'}")
    if task == "sql":
        return _offline_sql.generate(size=size, eval_size=eval_size, seed=seed, **options)
    return _GENERATORS[task](size=size, seed=seed, **options)


def load_task(
    task: str,
    source: str = OFFLINE,
    *,
    size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    train_split: str | None = None,
    eval_split: str | None = None,
    eval_fraction: float = 0.05,
    cop_base: int = 0,
    max_train_records: int | None = None,
    max_eval_records: int | None = None,
    protocol: str | None = None,
    offline_options: Mapping[str, Any] | None = None,
) -> TaskData:
    """Loads a task's records from the hub, a local file/folder, or the offline generators.

    Args:
      task: 'sql', 'med' or 'fact'.
      source: ``'offline'`` (generated here from ``seed``, no downloads), a hub name
        (``'gretelai/synthetic_text_to_sql'``, ``'openlifescienceai/medmcqa'``, a CounterFact
        mirror) or a local ``.json``/``.jsonl``/``.parquet`` file or dataset folder.
      size: offline only: number of training units (SQL examples, MCQ facts, counterfact
        cases; default 1000). See ``molf_jax/data/README.md`` for what each unit yields.
      eval_size: offline SQL only: number of held-out examples (default ``size // 5``).
      seed: offline generation seed, and the seed of the train/eval carve-out.
      train_split: split to train on (default ``'train'``, or the only split).
      eval_split: split to evaluate on (default: the task's usual split if the source has it,
        else ``eval_fraction`` of the training rows, chosen by ``seed``).
      eval_fraction: fraction carved out of training rows when there is no evaluation split.
      cop_base: index base of MedMCQA's ``cop`` (0 for the hub data, 1 for the original JSON).
      max_train_records: keep only the first N training records (source order).
      max_eval_records: keep only the first N evaluation records (source order).
      protocol: 'authors' or 'molf_jax' (default: 'molf_jax', whatever the source);
        under 'authors' SQL rows with a blank schema are kept, as the authors keep them.
      offline_options: offline only: options of the task's generator
        (:func:`offline_option_names`): SQL ``held_out_kinds`` (query kinds training never
        sees), Med ``known_only``, Fact ``anchors``. See ``molf_jax/data/README.md``.

    Returns:
      A :class:`TaskData`.

    Example:
      >>> data = load_task('med', 'offline', size=20, seed=0)
      >>> data.task, len(data.eval) > 0
      ('med', True)
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    protocol = resolve_protocol(protocol)
    dropped: dict[str, int] = {}
    if offline_options and source != OFFLINE:
        raise ValueError(f"offline_options apply to source 'offline' only, not {source!r}")
    if source == OFFLINE:
        train, evals = _load_offline(task, size, eval_size, seed, dict(offline_options or {}))
    else:
        read = read_source(source)
        names = list(read.splits)
        if train_split is None:
            train_split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
        if train_split not in read.splits:
            raise ValueError(
                f"{source}: no training split {train_split!r}; splits are {names} "
                "(pass train_split=...)"
            )
        if eval_split is None:
            eval_split = next(
                (s for s in _EVAL_SPLITS[task] if s in read.splits and s != train_split), None
            )
        elif eval_split not in read.splits:
            raise ValueError(f"{source}: no evaluation split {eval_split!r}; splits are {names}")
        options = {"cop_base": cop_base, "protocol": protocol}
        train = _clean_split(
            task, read.splits[train_split], read.where[train_split], train_split, dropped,
            **options,
        )
        if eval_split is not None:
            evals = _clean_split(
                task, read.splits[eval_split], read.where[eval_split], eval_split, dropped,
                **options,
            )
        elif task == "fact":
            evals = train
        else:
            train, evals = _carve_eval(train, eval_fraction, seed)
            logger.info(
                "%s: no evaluation split; held out %d of %d training rows (seed %d)",
                source, len(evals), len(train) + len(evals), seed,
            )
    if max_train_records is not None:
        train = train[:max_train_records]
    if max_eval_records is not None:
        evals = evals[:max_eval_records]
    return TaskData(task=task, train=train, eval=evals, source=source, dropped=dropped,
                    protocol=protocol)
