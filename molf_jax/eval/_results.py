"""Appending evaluation result rows to a CSV or JSONL file (chosen by the file extension)."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Mapping

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
    ext = os.path.splitext(path)[1].lower()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if ext == ".jsonl":
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(row), sort_keys=False) + "\n")
        return
    if ext != ".csv":
        raise ValueError(f"result file {path}: extension must be .csv or .jsonl")
    extra = [k for k in row if k not in RESULT_FIELDS]
    if extra:
        raise ValueError(f"result row for {path}: CSV takes only {RESULT_FIELDS}, got {extra}")
    new_file = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new_file:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != RESULT_FIELDS:
            raise ValueError(f"result file {path}: header {header} is not {list(RESULT_FIELDS)}")
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerow(dict(row))


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
