"""Reading a task's rows through `datasets`: a hub name or a local file/folder.

Local sources: a ``.json`` file (JSON lines or one JSON list), ``.jsonl``, ``.parquet``, a folder
written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, or a folder of data files
(for example a hub snapshot) whose file names carry the split (``train``/``test``/...).
Anything else that does not exist locally is passed to ``datasets.load_dataset`` as a hub name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class SourceSplits:
    """Rows of every split of one source.

    Attributes:
      splits: split name -> list of row dicts (nested structures as plain dicts/lists).
      where: split name -> human-readable origin, used in error messages (file path or
        ``"<folder or hub name> [split]"``).
    """

    splits: dict[str, list[dict[str, Any]]]
    where: dict[str, str]


def _is_local(source: str) -> bool:
    if os.path.exists(source):
        return True
    if source.startswith((".", "/", "~")):
        return True
    return any(source.endswith(ext) for ext in _FILE_BUILDERS)


def _read(label: str, load: Callable[[], Any], *, quiet: bool = False) -> Any:
    """Calls a `datasets` loader, re-raising its errors with the source named. ``quiet`` hides
    its progress bars (a local file loads in a blink; a bar there only clutters messages)."""
    import datasets

    shown = not datasets.utils.are_progress_bars_disabled()
    if quiet and shown:
        datasets.disable_progress_bars()
    try:
        return load()
    except Exception as e:  # `datasets` raises many types; all become one named error.
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(e))
        if empty:
            raise ValueError(f"{label} [{empty.group(1)}]: split is empty (no rows)") from e
        raise ValueError(f"{label}: `datasets` could not read it: {e}") from e
    finally:
        if quiet and shown:
            datasets.enable_progress_bars()


def _from_dataset_dict(dataset_dict, label: str) -> SourceSplits:
    splits = {name: ds.to_list() for name, ds in dataset_dict.items()}
    return SourceSplits(splits=splits, where={name: f"{label} [{name}]" for name in splits})


def _check_json_lines(path: str) -> None:
    """Names the first line of a JSON-lines file that is not JSON (`datasets` names none).
    A file that starts with ``[`` is one JSON list and is left to `datasets`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.read(4096).lstrip()
    if first.startswith("["):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is not a JSON object")


def read_source(source: str) -> SourceSplits:
    """Reads all splits of ``source`` (hub name or local path) into plain row dicts.

    A single local file becomes one split named ``"train"``.

    Raises:
      FileNotFoundError: a local path that does not exist (the message names it).

    Example:
      >>> read_source('tests/fixtures/counterfact.json').splits.keys()  # doctest: +SKIP
      dict_keys(['train'])
    """
    import datasets  # Deferred: importing `datasets` costs about a second.

    if not _is_local(source):
        return _from_dataset_dict(_read(source, lambda: datasets.load_dataset(source)), source)

    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source {source!r}: no such file or folder")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(
            os.path.join(path, "state.json")
        ):
            loaded = _read(path, lambda: datasets.load_from_disk(path))
            if isinstance(loaded, datasets.Dataset):
                return SourceSplits(splits={"train": loaded.to_list()}, where={"train": path})
            return _from_dataset_dict(loaded, path)
        return _from_dataset_dict(_read(path, lambda: datasets.load_dataset(path)), path)

    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise ValueError(
            f"data source {source!r}: unsupported file type {ext!r}; "
            f"expected one of {sorted(_FILE_BUILDERS)} or a dataset folder"
        )
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: file is empty (no rows)")
    if _FILE_BUILDERS[ext] == "json":
        _check_json_lines(path)
    loaded = _read(
        path, lambda: datasets.load_dataset(_FILE_BUILDERS[ext], data_files={"train": path}),
        quiet=True,
    )
    return SourceSplits(splits={"train": loaded["train"].to_list()}, where={"train": path})
