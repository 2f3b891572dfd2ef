"""Reading a run directory's logs (written by ``molf_jax.train``) into arrays for plotting.

Files read, all under the run directory (named by `molf_jax.run_dir.RunDir`):

* ``run_config.json``: the TrainConfig as a dict (mode, model, task, ...).
* ``metrics.jsonl``: one object per logging interval with at least ``step`` and ``loss``
  (null for a non-finite loss).
* ``routing_modules.json`` (molf, molfe): ``modules`` (one row name per routed module, stacked
  layers expanded, e.g. ``layers/3/self_attn/q_proj``), ``experts`` (one label per expert
  column; column 0 is the FFT expert), ``valid`` ([rows][columns] of bools).
* ``routing.jsonl`` (molf, molfe): per logged step ``{"step", "winners": [[0/1]],
  "scores": [[float or null]]}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from molf_jax.run_dir import RunDir
from molf_jax.train.modes import MODES

__all__ = ["RoutingLog", "RunRecord", "layer_of", "projection_of", "read_run"]

_LAYER = re.compile(r"(?:^|/)layers/(\d+)(?:/|$)|\[(\d+)\]$")


@dataclasses.dataclass(frozen=True)
class RoutingLog:
    """The routing log of a run as arrays.

    Attributes:
      modules: row names, [M].
      experts: expert column labels, [E].
      valid: bool [M, E]; which experts each module has.
      steps: int [S]; the logged optimizer steps.
      winners: bool [S, M, E]; the experts whose update was applied.
      scores: float [S, M, E]; the routing scores (-inf where the module has no such expert).
    """

    modules: tuple[str, ...]
    experts: tuple[str, ...]
    valid: np.ndarray
    steps: np.ndarray
    winners: np.ndarray
    scores: np.ndarray

    def top_winner(self) -> np.ndarray:
        """int [S, M]: the applied expert with the highest score (the only one with top-1);
        -1 where a module applied none."""
        masked = np.where(self.winners, self.scores, -np.inf)
        best = np.argmax(masked, axis=-1)
        # A winner with a -inf/NaN score still counts; argmax over the 0/1 mask finds it.
        fallback = np.argmax(self.winners, axis=-1)
        best = np.where(np.isfinite(np.max(masked, axis=-1)), best, fallback)
        return np.where(self.winners.any(axis=-1), best, -1)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a run directory holds for plotting.

    Attributes:
      run_dir: the directory.
      config: ``run_config.json`` as a dict.
      metric_steps: int [N]; loss: float [N] (NaN where the loss was not finite).
      routing: the routing log (None for fft and lora runs).
    """

    run_dir: Path
    config: dict[str, Any]
    metric_steps: np.ndarray
    loss: np.ndarray
    routing: RoutingLog | None

    @property
    def mode(self) -> str:
        return str(self.config.get("mode", "?"))

    def describe(self) -> str:
        """``"molf, qwen2.5-0.5b, task fact"``: mode, model (folder name) and task."""
        model = os.path.basename(os.path.normpath(str(self.config.get("model", "?"))))
        parts = [self.mode, model]
        if "task" in self.config:
            parts.append(f"task {self.config['task']}")
        return ", ".join(parts)


def read_run(run_dir: str | os.PathLike) -> RunRecord:
    """Reads and checks the logs of a run directory.

    Raises:
      FileNotFoundError: the directory or a needed file is missing.
      ValueError: a file is empty or malformed (the message names the file and line).

    Example:
      >>> record = read_run("runs/molf")   # doctest: +SKIP
      >>> record.routing.winners.shape     # doctest: +SKIP
      (100, 168, 2)
    """
    files = RunDir(run_dir)
    if not files.path.is_dir():
        raise FileNotFoundError(f"{files.path}: no such run directory")
    config = _read_json(files.config)
    if not isinstance(config, dict):
        raise ValueError(f"{files.config}: expected a JSON object")
    steps, loss = _read_metrics(files.metrics)
    routing = None
    routed = config.get("mode") in MODES and MODES[config["mode"]].routes
    if routed or files.routing_table.exists():
        routing = _read_routing(files)
    return RunRecord(files.path, config, steps, loss, routing)


def projection_of(module: str) -> str:
    """The projection type of a module row: ``"layers/3/self_attn/q_proj"`` -> ``"q_proj"``."""
    return re.sub(r"\[\d+\]$", "", module).rsplit("/", 1)[-1]


def layer_of(module: str) -> int:
    """The layer index of a module row (``layers/3/...`` or a ``[3]`` suffix).

    Raises:
      ValueError: the row names no layer.
    """
    match = _LAYER.search(module)
    if match is None:
        raise ValueError(f"routing module row {module!r} names no layer index "
                         "(expected 'layers/<i>/...')")
    return int(match.group(1) or match.group(2))


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: missing; is {path.parent} a run directory written by "
                             "'molf-jax train'?")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise _missing(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise _missing(path)
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            # A run still writing (or killed mid-write) leaves an unterminated last line.
            if number == len(lines) and not text.endswith("\n"):
                continue
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{number}: expected an object with an integer 'step'")
        rows.append((number, row))
    if not rows:
        raise ValueError(f"{path}: empty, no step was logged")
    return rows


def _read_metrics(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = _read_jsonl(path)
    steps, loss = [], []
    for number, row in rows:
        if "loss" not in row:
            raise ValueError(f"{path}:{number}: no 'loss' field")
        value = row["loss"]
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"{path}:{number}: 'loss' is {value!r}, expected a number or null")
        steps.append(row["step"])
        loss.append(math.nan if value is None else float(value))
    keep = _last_per_step(steps)
    return np.asarray(steps, np.int64)[keep], np.asarray(loss, np.float64)[keep]


def _last_per_step(steps: list[int]) -> np.ndarray:
    """Indices that sort by step, keeping the last line of a step logged twice (a resumed run
    appends the steps after its checkpoint again)."""
    last = {step: i for i, step in enumerate(steps)}
    return np.asarray([last[step] for step in sorted(last)], np.int64)


def _read_routing(files: RunDir) -> RoutingLog:
    table_path = files.routing_table
    table = _read_json(table_path)
    try:
        modules = tuple(str(m) for m in table["modules"])
        experts = tuple(str(e) for e in table["experts"])
        valid = np.asarray(table["valid"], dtype=bool)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{table_path}: expected 'modules', 'experts' and 'valid' ({err})"
                         ) from None
    if not modules:
        raise ValueError(f"{table_path}: no routed modules listed")
    if valid.shape != (len(modules), len(experts)):
        raise ValueError(f"{table_path}: 'valid' has shape {valid.shape}, expected "
                         f"({len(modules)} modules, {len(experts)} experts)")
    for module in modules:
        layer_of(module)

    log_path = files.routing
    if not log_path.is_file():
        raise _missing(log_path)
    if log_path.stat().st_size == 0:
        raise ValueError(f"{log_path}: empty, no routing step was logged (was the run trained "
                         "with --routing-log-every 0?)")
    steps, winners, scores = [], [], []
    for number, row in _read_jsonl(log_path):
        try:
            won = np.asarray(row["winners"], dtype=np.int64)
            score = np.asarray([[-math.inf if s is None else s for s in r] for r in row["scores"]],
                               dtype=np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{log_path}:{number}: expected 'winners' and 'scores' as "
                             f"[modules][experts] arrays ({err})") from None
        for name, array in (("winners", won), ("scores", score)):
            if array.shape != valid.shape:
                raise ValueError(f"{log_path}:{number}: '{name}' has shape {array.shape}, but "
                                 f"{table_path.name} lists {valid.shape[0]} modules x "
                                 f"{valid.shape[1]} experts")
        steps.append(row["step"])
        winners.append(won.astype(bool))
        scores.append(score)
    keep = _last_per_step(steps)
    return RoutingLog(modules, experts, valid, np.asarray(steps, np.int64)[keep],
                      np.stack(winners)[keep], np.stack(scores)[keep])
