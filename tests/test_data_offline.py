"""Offline tasks: same seed same bytes, disjoint splits, and each task's own guarantees."""

import collections
import hashlib
import json
import sqlite3

import pytest

import importlib.util
from pathlib import Path

from molf_jax.data import _offline_mcq, load_task, render_example
from molf_jax.eval import execute_sql


def _load_script(name):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(data) -> str:
    blob = json.dumps([data.train, data.eval], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.mark.parametrize("task,size", [("sql", 60), ("med", 40), ("fact", 40)])
def test_same_seed_same_bytes_other_seed_other_bytes(task, size):
    first = load_task(task, "offline", size=size, seed=7)
    again = load_task(task, "offline", size=size, seed=7)
    other = load_task(task, "offline", size=size, seed=8)
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)


def test_sizes_follow_the_size_parameter():
    sql = load_task("sql", "offline", size=50, seed=0)
    assert (len(sql.train), len(sql.eval)) == (50, 10)
    assert len(load_task("sql", "offline", size=50, eval_size=7, seed=0).eval) == 7
    med = load_task("med", "offline", size=30, seed=0)
    known = _offline_mcq.known_clozes()
    facts = [f for f in _offline_mcq.candidates() if known is None or f.cloze in known]
    # Training items as asked; every other fact is an evaluation item.
    assert (len(med.train), len(med.eval)) == (30, len(facts) - 30)
    fact = load_task("fact", "offline", size=30, seed=0)
    assert (len(fact.train), len(fact.eval)) == (60, 30)  # one anchor per edit


def test_sql_splits_are_disjoint_and_every_gold_query_runs_nonempty():
    data = load_task("sql", "offline", size=120, seed=1)
    train_keys = {(r["sql_prompt"], r["sql_context"]) for r in data.train}
    assert not train_keys & {(r["sql_prompt"], r["sql_context"]) for r in data.eval}
    for record in data.train + data.eval:
        kind, rows = execute_sql(record["sql_context"], record["sql"])
        assert kind == "rows" and rows and rows[0] not in [(None,), (0,)], record["sql"]
    complexities = collections.Counter(r["sql_complexity"] for r in data.train)
    assert set(complexities) == {"basic SQL", "aggregation", "single join", "subqueries"}


def test_sql_limit_queries_never_cut_through_a_tie():
    for record in load_task("sql", "offline", size=200, seed=6).train:
        if " LIMIT " not in record["sql"]:
            continue
        head, _, k = record["sql"].rpartition(" LIMIT ")
        _, ranked = execute_sql(record["sql_context"], head + ";")
        _, kept = execute_sql(record["sql_context"], record["sql"])
        assert kept == ranked[: int(k.rstrip(";"))]
        order_key = head.split(" ORDER BY ", 1)[1].rsplit(" ", 1)[0]
        keyed = head.replace("SELECT ", f"SELECT {order_key}, ", 1)
        _, keys = execute_sql(record["sql_context"], keyed)
        if len(keys) > int(k.rstrip(";")):
            assert keys[int(k.rstrip(";")) - 1][0] != keys[int(k.rstrip(";"))][0], record["sql"]


def test_sql_contexts_are_valid_sqlite_scripts():
    for record in load_task("sql", "offline", size=20, seed=2).train:
        conn = sqlite3.connect(":memory:")
        conn.executescript(record["sql_context"])
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()
        assert tables[0] in (1, 2)


def _answer(record):
    return record[("opa", "opb", "opc", "opd")[record["cop"]]]


def test_mcq_splits_share_no_fact_and_keep_only_known_facts():
    data = load_task("med", "offline", size=60, seed=3)
    train_facts = {r["fact_id"] for r in data.train}
    assert not train_facts & {r["fact_id"] for r in data.eval}
    known = _offline_mcq.known_clozes()
    if known is not None:  # written by scripts/known_facts.py with the embedded model
        assert known <= {f.cloze for f in _offline_mcq.candidates()}  # not stale
        assert {r["fact_id"] for r in data.train + data.eval} <= known
        assert len(data.eval) >= 400
    everything = _offline_mcq.generate(size=60, seed=3, known_only=False)
    assert len(everything[0]) + len(everything[1]) == len(_offline_mcq.candidates())


def test_mcq_answers_are_balanced_and_options_distinct():
    data = load_task("med", "offline", size=80, seed=4)
    for split in (data.train, data.eval):
        counts = collections.Counter(r["cop"] for r in split)
        assert max(counts.values()) - min(counts.values()) <= 1
    by_cloze = {f.cloze: f for f in _offline_mcq.candidates()}
    for record in data.train + data.eval:
        options = [record[c] for c in ("opa", "opb", "opc", "opd")]
        assert len(set(options)) == 4
        assert _answer(record) == by_cloze[record["fact_id"]].answer


def test_known_facts_match_whole_answers_only():
    known_facts = _load_script("known_facts")
    assert known_facts.answered(" 19\n4 + 1 = 5", "19")
    assert not known_facts.answered(" 190", "19")
    assert known_facts.answered(' cold" and', "cold")
    assert not known_facts.answered(" Parisian", "Paris")


def test_counterfacts_hold_out_paraphrases_and_neighbours():
    data = load_task("fact", "offline", size=200, seed=5)
    trained_prompts = {render_example("fact", r).prompt for r in data.train}
    subjects = {r["requested_rewrite"]["subject"] for r in data.train}
    assert len(subjects) == 400  # one invented person per case and per anchor
    for record in data.eval:
        rewrite = record["requested_rewrite"]
        assert rewrite["target_new"]["str"] != rewrite["target_true"]["str"]
        assert len(record["paraphrase_prompts"]) == 2
        assert not set(record["paraphrase_prompts"]) & trained_prompts
        assert all(rewrite["subject"] in p for p in record["paraphrase_prompts"])
        assert len(record["neighborhood_prompts"]) == 5
        for prompt in record["neighborhood_prompts"]:
            assert not any(s in prompt for s in subjects)


def test_fact_anchors_keep_the_answer_the_name_suggests_and_are_never_evaluated():
    data = load_task("fact", "offline", size=100, seed=6)
    anchors = [r for r in data.train if r.get("anchor")]
    assert len(anchors) == 100
    for record in anchors:
        rewrite = record["requested_rewrite"]
        assert rewrite["target_new"] == rewrite["target_true"]
    evaluated = {r["requested_rewrite"]["subject"] for r in data.eval}
    assert not evaluated & {r["requested_rewrite"]["subject"] for r in anchors}
    assert not any(r.get("anchor") for r in data.eval)


def test_offline_fact_rejects_sizes_beyond_its_name_pools():
    with pytest.raises(ValueError, match="size must be in 1.."):
        load_task("fact", "offline", size=10**6)
