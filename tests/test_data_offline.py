"""Offline tasks: same seed same bytes, disjoint splits, and each task's own guarantees."""

import collections
import hashlib
import json
import sqlite3

import pytest

from molf_jax.data import load_task, render_example
from molf_jax.eval import execute_sql


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
    assert (len(med.train), len(med.eval)) == (120, 30)  # 4 training wordings per fact
    fact = load_task("fact", "offline", size=30, seed=0)
    assert len(fact.train) == len(fact.eval) == 30


def test_sql_splits_are_disjoint_and_every_gold_query_runs_nonempty():
    data = load_task("sql", "offline", size=120, seed=1)
    train_keys = {(r["sql_prompt"], r["sql_context"]) for r in data.train}
    assert not train_keys & {(r["sql_prompt"], r["sql_context"]) for r in data.eval}
    for record in data.train + data.eval:
        kind, rows = execute_sql(record["sql_context"], record["sql"])
        assert kind == "rows" and rows and rows[0] not in [(None,), (0,)], record["sql"]
    complexities = collections.Counter(r["sql_complexity"] for r in data.train)
    assert set(complexities) == {"basic SQL", "aggregation", "single join"}


def test_sql_contexts_are_valid_sqlite_scripts():
    for record in load_task("sql", "offline", size=20, seed=2).train:
        conn = sqlite3.connect(":memory:")
        conn.executescript(record["sql_context"])
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()
        assert tables[0] in (1, 2)


def _answer(record):
    return record[("opa", "opb", "opc", "opd")[record["cop"]]]


def test_mcq_eval_items_ask_facts_stated_only_in_training_in_another_wording():
    data = load_task("med", "offline", size=60, seed=3)
    train_prompts = {render_example("med", r).prompt for r in data.train}
    by_fact = collections.defaultdict(list)
    for record in data.train:
        by_fact[record["fact_id"]].append(record)
    for record in data.eval:
        assert render_example("med", record).prompt not in train_prompts
        same_fact = by_fact[record["fact_id"]]
        assert len(same_fact) == 4
        # The fact is stated in training, in four other wordings, always with the same answer.
        assert {_answer(r) for r in same_fact} == {_answer(record)}
        wordings = {r["question"] for r in same_fact}
        assert len(wordings) == 4 and record["question"] not in wordings


def test_mcq_answers_are_balanced_and_options_distinct():
    data = load_task("med", "offline", size=80, seed=4)
    assert collections.Counter(r["cop"] for r in data.eval) == {0: 20, 1: 20, 2: 20, 3: 20}
    for record in data.train + data.eval:
        options = [record[c] for c in ("opa", "opb", "opc", "opd")]
        assert len(set(options)) == 4


def test_counterfacts_hold_out_paraphrases_and_neighbours():
    data = load_task("fact", "offline", size=200, seed=5)
    trained_prompts = {render_example("fact", r).prompt for r in data.train}
    subjects = {r["requested_rewrite"]["subject"] for r in data.train}
    assert len(subjects) == 200  # one case per invented person
    for record in data.eval:
        rewrite = record["requested_rewrite"]
        assert rewrite["target_new"]["str"] != rewrite["target_true"]["str"]
        assert len(record["paraphrase_prompts"]) == 2
        assert not set(record["paraphrase_prompts"]) & trained_prompts
        assert all(rewrite["subject"] in p for p in record["paraphrase_prompts"])
        assert len(record["neighborhood_prompts"]) == 5
        for prompt in record["neighborhood_prompts"]:
            assert not any(s in prompt for s in subjects)


def test_offline_fact_rejects_sizes_beyond_its_name_pools():
    with pytest.raises(ValueError, match="size must be in 1.."):
        load_task("fact", "offline", size=10**6)
