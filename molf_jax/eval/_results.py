"""Appending evaluation result rows to a CSV or JSONL file (chosen by the file extension)."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Mapping

from molf_jax.paths import writable_file

RESULT_FIELDS = ("model", "task", "metric", "value", "n", "seconds")


def append_result_row(path: str, row: Mapping[str, Any]) -> None:
    """Appends one result row to ``path`` (``.csv`` or ``.jsonl``), creating it if needed.

    A row needs every field of ``RESULT_FIELDS`` (model, task, metric, value, n, seconds).
    JSONL rows may carry extra keys; a CSV file keeps exactly these columns, with a header
    written when the file is new or empty.

    Example:
      >>> import tempfile, os
      >>> path = os.path.join(tempfile.mkdtemp(), 'results.jsonl')
      >>> append_result_row(path, {'model': 'm', 'task': 'med', 'metric': 'accuracy',
      ...                          'value': 0.5, 'n': 2, 'seconds': 1.0})
      >>> open(path).read().count('\\n')
      1
    """
    missing = [f for f in RESULT_FIELDS if f not in row]
    if missing:
        raise ValueError(f"result row for {path}: missing field(s) {missing}")
    check_results_file(path)
    if path.lower().endswith(".jsonl"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(row), sort_keys=False) + "\n")
        return
    extra = [k for k in row if k not in RESULT_FIELDS]
    if extra:
        raise ValueError(f"result row for {path}: CSV takes only {RESULT_FIELDS}, got {extra}")
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerow(dict(row))


def check_results_file(path: str) -> None:
    """Checks that rows can be appended to ``path``: extension ``.csv`` or ``.jsonl``, a
    writable place, and for an existing CSV the header ``RESULT_FIELDS``. `molf-jax eval`
    calls it before scoring, so a bad file costs no evaluation.

    Raises:
      ValueError: the message names the file and what is wrong.

    Example:
      >>> check_results_file("results.txt")                     # doctest: +SKIP
      ValueError: --results results.txt: extension must be .csv or .jsonl
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl"):
        raise ValueError(f"--results {path}: extension must be .csv or .jsonl")
    writable_file(path, "--results")
    if ext == ".csv" and os.path.exists(path) and os.path.getsize(path):
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != RESULT_FIELDS:
            raise ValueError(f"--results {path}: header {header} is not {list(RESULT_FIELDS)}")


def report_metrics(model: str, task: str, metrics: Mapping[str, Mapping[str, Any]],
                   seconds: float, results_path: str | None) -> None:
    """Prints ``metrics`` as JSON and, with a results file, appends one row per metric."""
    print(json.dumps({"model": model, "task": task, "seconds": round(seconds, 3),
                      "metrics": metrics}, indent=2))
    if results_path:
        for metric, result in metrics.items():
            append_result_row(results_path, {
                "model": model, "task": task, "metric": metric, "value": result["value"],
                "n": result["n"], "seconds": round(seconds, 3),
            })
