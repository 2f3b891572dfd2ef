"""The authors' SQL scoring, restated from their ``eval_sql.py`` (11785T23/molf at 24f2c9f).

Kept as they wrote it, because their numbers depend on it:

* ``postprocess_sql`` takes a fenced code block if there is one, else cuts the generation from
  the **last** SQL keyword (so a subquery, CTE, UNION or ``INSERT ... SELECT`` keeps only its
  last part, even when the model got the query right), then cuts at the first ``;``, upper-cases
  keywords with sqlparse and appends ``;``.
* Exact match: ``gold.strip().upper() == prediction.strip().upper()`` (a gold query without a
  trailing ``;`` can never match).
* Execution: rows compared as ``set()``s (order and duplicates ignored); a DML statement is
  compared on ``SELECT *`` of the first table after INTO/UPDATE/FROM; a statement without rows
  gives ``[]``.
* Rows whose gold query fails in sqlite are left out of every metric, exact match included.

One addition of ours: queries are stopped after :data:`MAX_SQLITE_STEPS` sqlite steps (theirs
have no limit and would hang) and count as failing.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any, Mapping, Sequence

import sqlparse

from molf_jax.eval._sql_metrics import MAX_SQLITE_STEPS

SQL_KEYWORDS = ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP",
                "REPLACE", "TRUNCATE")
_CODE_BLOCK = re.compile(r"```(?:sql)?\s+(.*?)\s+```", re.DOTALL | re.IGNORECASE)
_KEYWORD = re.compile("|".join(rf"\b{k}\b" for k in SQL_KEYWORDS), re.IGNORECASE)
_DML_TABLE = re.compile(r"(?:INTO|UPDATE|FROM)\s+[`\"'\[]?(\w+)[`\"'\]]?")


def authors_extract_sql(generation: str) -> str:
    """The authors' predicted query from a generation: their ``postprocess_sql`` plus ``";"``.

    Example:
      >>> authors_extract_sql('SELECT name FROM t WHERE id IN (SELECT id FROM u);')
      'SELECT id FROM u);'
      >>> authors_extract_sql('select a from t;\\n\\nmore')
      'SELECT a FROM t;'
    """
    block = _CODE_BLOCK.search(generation)
    if block:
        sql = block.group(1)
    else:
        starts = list(_KEYWORD.finditer(generation))
        sql = generation[starts[-1].start():] if starts else generation
    sql = sql.split(";")[0].strip()
    sql = sql.split("# SQL:")[-1].strip()
    sql = sql.split("\n\n")[0].strip()
    try:
        sql = sqlparse.format(sql, reindent=False, keyword_case="upper").strip()
    except Exception:  # Their code falls back to the unformatted text on any error.
        sql = sql.strip()
    return (sql + ";").strip()


def authors_exact_match(prediction: str, gold: str) -> bool:
    """Their exact match: stripped, upper-cased, otherwise untouched text.

    Example:
      >>> authors_exact_match('SELECT a FROM t;', 'select a from t;'), \\
      ...     authors_exact_match('SELECT a FROM t;', 'SELECT a FROM t')
      (True, False)
    """
    return gold.strip().upper() == prediction.strip().upper()


def authors_execute(context: str, sql: str, *, max_steps: int = MAX_SQLITE_STEPS):
    """Runs ``sql`` after ``context`` as their ``SQLExecutor.execute``: ``(ran, result)``.

    The result is the fetched rows; for INSERT/UPDATE/DELETE, the rows of the first table named
    after INTO/UPDATE/FROM; on failure, the error text.

    Example:
      >>> authors_execute('CREATE TABLE t (a INT); INSERT INTO t VALUES (1);',
      ...                 'DELETE FROM t WHERE a = 1;')
      (True, [])
    """
    conn = sqlite3.connect(":memory:")
    steps = [0]

    def abort_when_too_long() -> int:
        steps[0] += 1000
        return int(steps[0] > max_steps)

    try:
        cursor = conn.cursor()
        cursor.executescript(context)
        conn.set_progress_handler(abort_when_too_long, 1000)
        cursor.execute(sql)
        upper = sql.upper().strip()
        if any(upper.startswith(kw) for kw in ("INSERT", "UPDATE", "DELETE")):
            table = _DML_TABLE.search(upper)
            if table:
                cursor.execute(f"SELECT * FROM {table.group(1)}")
                return True, cursor.fetchall()
            return True, [("rows_affected", cursor.rowcount)]
        return True, cursor.fetchall()
    except Exception as e:  # Theirs: any failure is "did not run", with its message.
        return False, str(e)
    finally:
        conn.close()


def authors_results_match(gold: Any, predicted: Any) -> bool:
    """Their comparison: equal as sets of rows (order and duplicates ignored).

    Example:
      >>> authors_results_match([(1,), (2,), (2,)], [(2,), (1,)])
      True
    """
    if gold is None or predicted is None:
        return gold is None and predicted is None
    try:
        return set(gold) == set(predicted)
    except TypeError:
        return gold == predicted


def authors_sql_metrics(generations: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict:
    """Their exact match and execution accuracy (fractions) over the rows whose gold runs.

    Args:
      generations: raw generated text per record (extracted here with their postprocess).
      records: gretelai-format records (``sql_context``, ``sql``).

    Returns:
      ``{'authors_exact_match', 'authors_execution_accuracy'}`` with ``n`` = rows whose gold
      query ran, and ``'authors_gold_failed'`` (count of the rows left out, ``n`` = all rows).

    Example:
      >>> rec = {'sql_context': 'CREATE TABLE t (a INT);', 'sql': 'SELECT a FROM t;'}
      >>> bad = {'sql_context': '', 'sql': 'SELECT a FROM missing;'}
      >>> authors_sql_metrics(['select a from t', 'x'], [rec, bad])['authors_exact_match']
      {'value': 1.0, 'n': 1}
    """
    if len(generations) != len(records):
        raise ValueError(f"{len(generations)} generations for {len(records)} records")
    scored, exact, correct, gold_failed = 0, 0, 0, 0
    for generation, record in zip(generations, records):
        gold = str(record["sql"]).strip()
        context = str(record.get("sql_context") or "").strip()
        gold_ran, gold_result = authors_execute(context, gold)
        if not gold_ran:
            gold_failed += 1
            continue
        prediction = authors_extract_sql(generation)
        ran, result = authors_execute(context, prediction)
        exact += authors_exact_match(prediction, gold)
        correct += ran and authors_results_match(gold_result, result)
        scored += 1
    return {
        "authors_exact_match": {"value": exact / scored if scored else 0.0, "n": scored},
        "authors_execution_accuracy": {"value": correct / scored if scored else 0.0,
                                       "n": scored},
        "authors_gold_failed": {"value": gold_failed, "n": len(records)},
    }
