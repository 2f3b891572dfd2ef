"""Offline text-to-SQL: random sqlite tables and rows, template questions, gold queries that run.

Every example gets its own schema (one table, and 70% of the time a child table joined on a
foreign key) with invented row names, written as ``CREATE TABLE ...; INSERT INTO ...;``
statements in ``sql_context`` like gretelai/synthetic_text_to_sql. Questions come from 19
templates with two or three wordings each: filters and aggregates, and the harder kinds (joins
with GROUP BY and HAVING, nested and anti-join subqueries, ranking over a join's sums), so that
fine-tuning on a thousand examples does not reach every held-out query (the earlier ten
templates saturated at 99-100% for every method). Gold SQL is in one canonical style; each gold
query runs at generation time and must return a non-empty result, and a LIMIT query must not
cut through a tie.
"""

from __future__ import annotations

import random
import sqlite3
from typing import Any

from molf_jax.data._names import invented_name

_TABLES = (
    "vessels", "farms", "clinics", "artists", "satellites", "warehouses", "rivers", "startups",
    "museums", "reactors", "orchards", "stadiums", "bakeries", "observatories", "libraries",
    "vineyards", "airports", "schools", "mines", "theaters", "bridges", "hotels", "studios",
    "laboratories", "festivals", "ferries", "galleries", "breweries", "dams", "parks",
)
_CHILDREN = (
    ("inspections", "score", "inspector"),
    ("shipments", "weight", "carrier"),
    ("donations", "amount", "donor_type"),
    ("repairs", "cost", "contractor"),
    ("visits", "duration", "visitor_type"),
    ("grants", "amount", "agency"),
    ("orders", "quantity", "channel"),
    ("incidents", "severity", "category"),
)
_TEXT_COLUMNS = {
    "region": ("North", "South", "East", "West", "Central"),
    "country": ("Kenya", "Chile", "Norway", "Vietnam", "Canada", "Egypt", "Peru", "Japan"),
    "status": ("active", "closed", "planned", "paused"),
    "category": ("small", "medium", "large"),
    "owner": ("public", "private", "cooperative"),
    "city": ("Lagos", "Denver", "Oslo", "Hanoi", "Quito", "Perth", "Dakar", "Riga"),
    "supplier": ("Acme", "Borealis", "Cobalt", "Dynamo", "Everest"),
    "sector": ("energy", "health", "transport", "retail", "education"),
}
_CHILD_TEXT = {
    "inspector": ("Ortiz", "Nakamura", "Okafor", "Larsen"),
    "carrier": ("rail", "truck", "ship", "air"),
    "donor_type": ("individual", "corporate", "foundation"),
    "contractor": ("Apex", "Keystone", "Summit", "Harbor"),
    "visitor_type": ("student", "tourist", "researcher"),
    "agency": ("federal", "state", "municipal"),
    "channel": ("online", "retail", "wholesale"),
    "category": ("minor", "major", "critical"),
}
_NUMBER_COLUMNS = {
    "capacity": (50, 5000),
    "budget": (1000, 90000),
    "age": (1, 120),
    "rating": (1, 10),
    "staff_count": (3, 400),
    "area": (10, 9000),
    "revenue": (500, 80000),
    "year_opened": (1950, 2023),
    "height": (5, 300),
    "output": (100, 20000),
}
_CHILD_NUMBER_RANGE = (1, 500)

# The query kinds (templates); the join kinds need a child table.
SINGLE_TABLE_KINDS = ("filter_text", "filter_number", "count", "average", "extreme", "group",
                      "top", "two_conditions", "above_average", "having", "count_distinct",
                      "either")
JOIN_KINDS = ("join_sum", "join_count", "join_group", "join_in", "join_not_in", "join_top",
              "join_having")
KINDS = SINGLE_TABLE_KINDS + JOIN_KINDS


def _table(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(_TABLES)
    text_cols = rng.sample(sorted(_TEXT_COLUMNS), 2)
    num_cols = rng.sample(sorted(_NUMBER_COLUMNS), 2)
    n_rows = rng.randint(4, 6)
    names: list[str] = []
    while len(names) < n_rows:
        candidate = invented_name(rng, syllables=rng.randint(2, 3))
        if candidate not in names:
            names.append(candidate)
    rows = []
    for i, row_name in enumerate(names, start=1):
        row = {"id": i, "name": row_name}
        for col in text_cols:
            row[col] = rng.choice(_TEXT_COLUMNS[col])
        for col in num_cols:
            low, high = _NUMBER_COLUMNS[col]
            row[col] = rng.randint(low, high)
        rows.append(row)
    columns = [("id", "INT"), ("name", "TEXT")]
    columns += [(c, "TEXT") for c in text_cols] + [(c, "INT") for c in num_cols]
    return {"name": name, "columns": columns, "rows": rows, "text": text_cols, "num": num_cols}


def _child_table(rng: random.Random, parent: dict[str, Any]) -> dict[str, Any]:
    name, num_col, text_col = rng.choice(_CHILDREN)
    fk = _singular(parent["name"]) + "_id"
    rows = []
    for i in range(1, rng.randint(4, 8) + 1):
        rows.append(
            {
                "id": i,
                fk: rng.randint(1, len(parent["rows"])),
                num_col: rng.randint(*_CHILD_NUMBER_RANGE),
                text_col: rng.choice(_CHILD_TEXT[text_col]),
            }
        )
    columns = [("id", "INT"), (fk, "INT"), (num_col, "INT"), (text_col, "TEXT")]
    return {"name": name, "columns": columns, "rows": rows, "fk": fk, "num": num_col,
            "text": text_col}


def _singular(plural: str) -> str:
    return plural[:-3] + "y" if plural.endswith("ies") else plural[:-1]


def _literal(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else str(value)


def _context(tables: list[dict[str, Any]]) -> str:
    parts = []
    for t in tables:
        cols = ", ".join(f"{c} {kind}" for c, kind in t["columns"])
        parts.append(f"CREATE TABLE {t['name']} ({cols});")
        names = ", ".join(c for c, _ in t["columns"])
        values = ", ".join(
            "(" + ", ".join(_literal(row[c]) for c, _ in t["columns"]) + ")" for row in t["rows"]
        )
        parts.append(f"INSERT INTO {t['name']} ({names}) VALUES {values};")
    return " ".join(parts)


def _pretty(column: str) -> str:
    return column.replace("_", " ")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _question(rng, t, child):
    """Returns (question, sql, complexity, kind) for one random template.

    Half the templates are the harder kinds (joins with GROUP BY, HAVING, nested subqueries,
    anti-joins, ranking over aggregates), so that a model fine-tuned on a thousand examples
    does not reach every query.
    """
    text_col, num_col = rng.choice(t["text"]), rng.choice(t["num"])
    row = rng.choice(t["rows"])
    value = row[text_col]
    numbers = sorted({r[num_col] for r in t["rows"]})
    threshold = numbers[rng.randrange(len(numbers) - 1)] if len(numbers) > 1 else numbers[0] - 1
    kinds = list(SINGLE_TABLE_KINDS) + (list(JOIN_KINDS) if child is not None else [])
    kind = rng.choice(kinds)
    return (*_template(rng, kind, t, child, text_col, num_col, value, threshold), kind)


def _template(rng, kind, t, child, text_col, num_col, value, threshold):
    """(question, sql, complexity) of ``kind``; draws its wording from ``rng``."""
    name = t["name"]
    tc, nc = _pretty(text_col), _pretty(num_col)
    if kind == "filter_text":
        q = rng.choice([
            f"List the names of {name} whose {tc} is {value}.",
            f"Which {name} have {tc} {value}? Give their names.",
            f"Show the name of every entry in {name} with {tc} equal to {value}.",
        ])
        return q, f"SELECT name FROM {name} WHERE {text_col} = '{value}';", "basic SQL"
    if kind == "filter_number":
        q = rng.choice([
            f"Which {name} have {_a(nc)} greater than {threshold}?",
            f"List the names of {name} with {nc} above {threshold}.",
            f"Find every entry in {name} whose {nc} exceeds {threshold}; return the name.",
        ])
        return q, f"SELECT name FROM {name} WHERE {num_col} > {threshold};", "basic SQL"
    if kind == "count":
        q = rng.choice([
            f"How many {name} have {tc} {value}?",
            f"Count the {name} whose {tc} is {value}.",
            f"What is the number of {name} with {tc} equal to {value}?",
        ])
        return q, f"SELECT COUNT(*) FROM {name} WHERE {text_col} = '{value}';", "aggregation"
    if kind == "average":
        q = rng.choice([
            f"What is the average {nc} of {name} with {tc} {value}?",
            f"Compute the mean {nc} over {name} whose {tc} is {value}.",
        ])
        return q, f"SELECT AVG({num_col}) FROM {name} WHERE {text_col} = '{value}';", "aggregation"
    if kind == "extreme":
        func, word = rng.choice([("MAX", "highest"), ("MIN", "lowest")])
        q = rng.choice([
            f"What is the {word} {nc} among all {name}?",
            f"Find the {word} {nc} recorded in {name}.",
        ])
        return q, f"SELECT {func}({num_col}) FROM {name};", "aggregation"
    if kind == "group":
        func, word = rng.choice([("SUM", "total"), ("AVG", "average"), ("MAX", "largest")])
        q = rng.choice([
            f"Show the {word} {nc} for each {tc} in {name}.",
            f"For every {tc}, what is the {word} {nc} across {name}?",
        ])
        sql = f"SELECT {text_col}, {func}({num_col}) FROM {name} GROUP BY {text_col};"
        return q, sql, "aggregation"
    if kind == "top":
        k = rng.randint(1, 3)
        word, order = rng.choice([("largest", "DESC"), ("smallest", "ASC")])
        q = rng.choice([
            f"Which {k} {name} have the {word} {nc}?",
            f"List the top {k} {name} by {word} {nc}.",
        ])
        sql = f"SELECT name FROM {name} ORDER BY {num_col} {order} LIMIT {k};"
        return q, sql, "basic SQL"
    if kind == "two_conditions":
        q = rng.choice([
            f"List the names of {name} with {tc} {value} and {nc} of at least {threshold}.",
            f"Which {name} have {tc} {value} and {_a(nc)} no lower than {threshold}?",
        ])
        sql = (f"SELECT name FROM {name} WHERE {text_col} = '{value}' "
               f"AND {num_col} >= {threshold};")
        return q, sql, "basic SQL"
    if kind == "either":
        other = rng.choice([r[text_col] for r in t["rows"] if r[text_col] != value] or [value])
        q = rng.choice([
            f"Which {name} have {tc} {value} or {tc} {other}? Give their names.",
            f"List the names of {name} whose {tc} is either {value} or {other}.",
        ])
        sql = (f"SELECT name FROM {name} WHERE {text_col} = '{value}' "
               f"OR {text_col} = '{other}';")
        return q, sql, "basic SQL"
    if kind == "above_average":
        word, op = rng.choice([("above", ">"), ("below", "<")])
        q = rng.choice([
            f"Which {name} have {_a(nc)} {word} the average {nc} of all {name}?",
            f"List the names of {name} whose {nc} is {word} average.",
        ])
        sql = f"SELECT name FROM {name} WHERE {num_col} {op} (SELECT AVG({num_col}) FROM {name});"
        return q, sql, "subqueries"
    if kind == "having":
        q = rng.choice([
            f"Which values of {tc} appear in more than one of the {name}?",
            f"List every {tc} shared by at least two {name}.",
        ])
        sql = f"SELECT {text_col} FROM {name} GROUP BY {text_col} HAVING COUNT(*) > 1;"
        return q, sql, "aggregation"
    if kind == "count_distinct":
        q = rng.choice([
            f"How many different values of {tc} are there in {name}?",
            f"Count the distinct {tc} values among the {name}.",
        ])
        return q, f"SELECT COUNT(DISTINCT {text_col}) FROM {name};", "aggregation"
    c = child
    cn, ct = _pretty(c["num"]), _pretty(c["text"])
    join = f"{c['name']} JOIN {name} ON {c['name']}.{c['fk']} = {name}.id"
    linked = [r["name"] for r in t["rows"] if any(x[c["fk"]] == r["id"] for x in c["rows"])]
    parent_name = rng.choice(linked)
    child_value = rng.choice(c["rows"])[c["text"]]
    if kind == "join_sum":
        q = rng.choice([
            f"What is the total {cn} of {c['name']} for the {_singular(name)} named {parent_name}?",
            f"Sum the {cn} of all {c['name']} linked to {parent_name} in {name}.",
        ])
        sql = f"SELECT SUM({c['name']}.{c['num']}) FROM {join} WHERE {name}.name = '{parent_name}';"
        return q, sql, "single join"
    if kind == "join_count":
        q = rng.choice([
            f"How many {c['name']} are recorded for {parent_name}?",
            f"Count the {c['name']} of the {_singular(name)} called {parent_name}.",
        ])
        sql = f"SELECT COUNT(*) FROM {join} WHERE {name}.name = '{parent_name}';"
        return q, sql, "single join"
    if kind == "join_group":
        q = rng.choice([
            f"For each {tc} of the {name}, what is the total {cn} of their {c['name']}?",
            f"Show the sum of {c['name']} {cn} per {_singular(name)} {tc}.",
        ])
        sql = (f"SELECT {name}.{text_col}, SUM({c['name']}.{c['num']}) FROM {join} "
               f"GROUP BY {name}.{text_col};")
        return q, sql, "single join"
    if kind == "join_in":
        q = rng.choice([
            f"Which {name} have at least one of their {c['name']} with {ct} {child_value}?",
            f"List the names of {name} that have {c['name']} whose {ct} is {child_value}.",
        ])
        sql = (f"SELECT name FROM {name} WHERE id IN (SELECT {c['fk']} FROM {c['name']} "
               f"WHERE {c['text']} = '{child_value}');")
        return q, sql, "subqueries"
    if kind == "join_not_in":
        q = rng.choice([
            f"Which {name} have no {c['name']} at all?",
            f"List the names of {name} without any {c['name']}.",
        ])
        sql = f"SELECT name FROM {name} WHERE id NOT IN (SELECT {c['fk']} FROM {c['name']});"
        return q, sql, "subqueries"
    if kind == "join_top":
        word, order = rng.choice([("largest", "DESC"), ("smallest", "ASC")])
        q = rng.choice([
            f"Which {_singular(name)} has the {word} total {cn} over its {c['name']}?",
            f"Name the {_singular(name)} whose {c['name']} add up to the {word} {cn}.",
        ])
        sql = (f"SELECT {name}.name FROM {join} GROUP BY {name}.name "
               f"ORDER BY SUM({c['name']}.{c['num']}) {order} LIMIT 1;")
        return q, sql, "single join"
    q = rng.choice([
        f"Which {name} have more than one of their {c['name']}? Give their names.",
        f"List the names of {name} with at least two {c['name']}.",
    ])
    sql = (f"SELECT {name}.name FROM {join} GROUP BY {name}.name "
           f"HAVING COUNT(*) > 1;")
    return q, sql, "single join"


def _unambiguous(context: str, sql: str) -> bool:
    """A LIMIT query must not cut through a tie (two right answers)."""
    if " LIMIT " not in sql:
        return True
    head, _, tail = sql.rpartition(" LIMIT ")
    k = int(tail.rstrip(";"))
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(context)
        order = head.split(" ORDER BY ", 1)[1]
        keyed = head.replace("SELECT ", f"SELECT {order.rsplit(' ', 1)[0]}, ", 1)
        keys = [r[0] for r in conn.execute(keyed).fetchall()]
    finally:
        conn.close()
    return len(keys) <= k or keys[k - 1] != keys[k]


def _runs_nonempty(context: str, sql: str) -> bool:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(context)
        rows = conn.execute(sql).fetchall()
    finally:
        conn.close()
    return bool(rows) and rows[0] != (None,) and rows[0] != (0,)


def _example(rng: random.Random, index: int) -> tuple[dict[str, Any], str]:
    while True:
        table = _table(rng)
        child = _child_table(rng, table) if rng.random() < 0.7 else None
        tables = [table] + ([child] if child else [])
        context = _context(tables)
        question, sql, complexity, kind = _question(rng, table, child)
        # Resample (deterministically, from the same stream) until the gold result is non-empty,
        # so execution accuracy cannot be won by a query that returns nothing.
        if _runs_nonempty(context, sql) and _unambiguous(context, sql):
            return {
                "id": index,
                "domain": table["name"],
                "sql_complexity": complexity,
                "sql_prompt": question,
                "sql_context": context,
                "sql": sql,
            }, kind


def _check_kinds(held_out_kinds) -> tuple[str, ...]:
    if isinstance(held_out_kinds, str):
        raise ValueError(f"held_out_kinds must be a tuple of kind names, got the string "
                         f"{held_out_kinds!r}; write ({held_out_kinds!r},)")
    held = tuple(held_out_kinds)
    unknown = [k for k in held if k not in KINDS]
    if unknown:
        raise ValueError(f"held_out_kinds: unknown query kind(s) {unknown}; kinds are "
                         f"{', '.join(KINDS)}")
    if set(SINGLE_TABLE_KINDS) <= set(held):
        # Schemas without a child table only draw single-table kinds.
        raise ValueError("held_out_kinds holds out every single-table kind; training needs at "
                         f"least one of {', '.join(SINGLE_TABLE_KINDS)}")
    return held


def generate(
    *, size: int, eval_size: int | None = None, seed: int = 0,
    held_out_kinds: tuple[str, ...] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generates ``size`` training and ``eval_size`` (default ``size // 5``) held-out examples.

    Records follow the gretelai/synthetic_text_to_sql columns (``id``, ``domain``,
    ``sql_complexity``, ``sql_prompt``, ``sql_context``, ``sql``). No (question, context) pair
    appears in both splits.

    Args:
      size: training examples.
      eval_size: evaluation examples (default ``size // 5``, at least 1).
      seed: the generation seed.
      held_out_kinds: query kinds (:data:`KINDS`) training never sees: examples of those
        kinds drawn while training fills are discarded, so evaluation (drawn after training,
        from every kind) keeps the natural mix of kinds. When given, every record also gets
        ``query_kind`` and every evaluation record ``held_out_kind`` (bool). Left empty, the
        records are exactly those of earlier versions for the same ``size``, ``eval_size``
        and ``seed``.

    Example:
      >>> train, evals = generate(size=10, seed=0)
      >>> len(train), len(evals), train[0]['sql'].startswith('SELECT')
      (10, 2, True)
      >>> train, evals = generate(size=20, eval_size=40, seed=0, held_out_kinds=('join_top',))
      >>> 'join_top' in {r['query_kind'] for r in train}, type(evals[0]['held_out_kind'])
      (False, <class 'bool'>)
    """
    held = _check_kinds(held_out_kinds)
    eval_size = max(1, size // 5) if eval_size is None else eval_size
    rng = random.Random(f"molf-offline-sql-{seed}")
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    while len(train) + len(evals) < size + eval_size:
        record, kind = _example(rng, len(train) + len(evals))
        key = (record["sql_prompt"], record["sql_context"])
        if key in seen:
            continue
        filling_train = len(train) < size
        if filling_train and kind in held:
            continue
        seen.add(key)
        if held:
            record["query_kind"] = kind
            if not filling_train:
                record["held_out_kind"] = kind in held
        (train if filling_train else evals).append(record)
    return train, evals
