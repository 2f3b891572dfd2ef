"""SQL metrics: exact match after normalisation, and execution accuracy in sqlite3.

Execution accuracy builds a fresh in-memory database from the record's ``sql_context`` (the
``CREATE TABLE``/``INSERT`` statements of gretelai/synthetic_text_to_sql) for the gold query and
again for the prediction, runs each, and compares:

* queries that return rows: the rows, as a multiset (in order when the gold query has
  ``ORDER BY``), floats rounded to 6 decimals;
* statements that return nothing (INSERT/UPDATE/DELETE/...): the contents of every table after.

A prediction that fails to run (syntax error, unknown column, more than one statement, runaway
query) is wrong. A record whose context or gold query fails to run is skipped and counted.
"""

from __future__ import annotations

import collections
import re
import sqlite3
from typing import Any, Mapping, Sequence

# sqlite virtual-machine steps allowed per query before it is aborted (a cross join of a few
# small tables needs far fewer).
MAX_SQLITE_STEPS = 5_000_000


class SqlExecutionError(Exception):
    """A query (or the schema context) did not run in sqlite3."""


def extract_sql(generation: str) -> str:
    """The SQL part of a generation: text before a blank line or a new ``###`` section.

    Example:
      >>> extract_sql('SELECT 1;\\n\\n### Instruction: more')
      'SELECT 1;'
    """
    text = generation.split("\n\n", 1)[0].split("###", 1)[0]
    return text.strip()


def normalize_sql(sql: str) -> str:
    """Lower-cases, collapses whitespace, and strips trailing semicolons.

    Example:
      >>> normalize_sql('SELECT  name\\nFROM t ;')
      'select name from t'
    """
    text = re.sub(r"\s+", " ", sql.strip().lower())
    return text.rstrip("; ").strip()


def sql_exact_match(prediction: str, gold: str) -> bool:
    """Whether two queries are equal after :func:`normalize_sql`."""
    return normalize_sql(prediction) == normalize_sql(gold)


def _normalise_value(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _table_contents(conn: sqlite3.Connection) -> tuple:
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    contents = []
    for name in names:
        rows = conn.execute(f'SELECT * FROM "{name}"').fetchall()
        contents.append((name, tuple(sorted(map(repr, rows)))))
    return tuple(contents)


def execute_sql(context: str, query: str, *, max_steps: int = MAX_SQLITE_STEPS) -> tuple:
    """Runs ``query`` on a fresh database built from ``context``; returns a comparable result.

    Returns:
      ``('rows', rows)`` for a query with a result set, else ``('tables', contents)``.

    Raises:
      SqlExecutionError: the context or the query failed (the message says which).

    Example:
      >>> execute_sql('CREATE TABLE t (a INT); INSERT INTO t VALUES (1), (2);',
      ...             'SELECT SUM(a) FROM t')
      ('rows', [(3,)])
    """
    conn = sqlite3.connect(":memory:")
    try:
        try:
            conn.executescript(context)
        except sqlite3.Error as e:
            raise SqlExecutionError(f"context failed: {e}") from e
        steps = [0]

        def _abort_when_too_long() -> int:
            steps[0] += 1000
            return int(steps[0] > max_steps)

        conn.set_progress_handler(_abort_when_too_long, 1000)
        try:
            cursor = conn.execute(query)
            rows = cursor.fetchall() if cursor.description is not None else None
        except (sqlite3.Error, sqlite3.Warning, ValueError) as e:
            raise SqlExecutionError(f"query failed: {e}") from e
        if rows is not None:
            return ("rows", [tuple(_normalise_value(v) for v in row) for row in rows])
        conn.set_progress_handler(None, 0)
        return ("tables", _table_contents(conn))
    finally:
        conn.close()


def results_match(gold: tuple, predicted: tuple, *, ordered: bool) -> bool:
    """Compares two :func:`execute_sql` results (row order only matters when ``ordered``)."""
    if gold[0] != predicted[0]:
        return False
    if gold[0] == "tables" or ordered:
        return gold[1] == predicted[1]
    counts = collections.Counter(map(repr, gold[1]))
    return counts == collections.Counter(map(repr, predicted[1]))


def sql_metrics(predictions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict:
    """Exact match and execution accuracy of predicted SQL against the records' gold SQL.

    Args:
      predictions: predicted SQL per record (already cut with :func:`extract_sql`).
      records: gretelai-format records (``sql_context``, ``sql``).

    Returns:
      ``{'exact_match': {'value', 'n'}, 'execution_accuracy': {'value', 'n'},
      'execution_gold_failed': {'value': count, 'n': total}}``; ``execution_accuracy.n``
      excludes the skipped records.

    Example:
      >>> rec = {'sql_context': 'CREATE TABLE t (a INT);', 'sql': 'SELECT a FROM t;'}
      >>> sql_metrics(['select a from t'], [rec])['exact_match']
      {'value': 1.0, 'n': 1}
    """
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    exact, executed, correct, gold_failed = 0, 0, 0, 0
    for prediction, record in zip(predictions, records):
        exact += sql_exact_match(prediction, record["sql"])
        try:
            gold = execute_sql(record["sql_context"], record["sql"])
        except SqlExecutionError:
            gold_failed += 1
            continue
        executed += 1
        try:
            predicted = execute_sql(record["sql_context"], prediction)
        except SqlExecutionError:
            continue
        ordered = "order by" in normalize_sql(record["sql"])
        correct += results_match(gold, predicted, ordered=ordered)
    n = len(records)
    return {
        "exact_match": {"value": exact / n if n else 0.0, "n": n},
        "execution_accuracy": {"value": correct / executed if executed else 0.0, "n": executed},
        "execution_gold_failed": {"value": gold_failed, "n": n},
    }
