"""Offline tasks: same seed same bytes, disjoint splits, and each task's own guarantees."""

import collections
import hashlib
import json
import sqlite3

import pytest

from molf_jax.data import (
    SQL_KINDS,
    _offline_mcq,
    _offline_sql,
    forgetting_probe,
    load_task,
    offline_option_names,
    render_example,
)
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
    from molf_jax.eval import answered

    assert answered(" 19\n4 + 1 = 5", "19")
    assert not answered(" 190", "19")
    assert answered(' cold" and', "cold")
    assert not answered(" Parisian", "Paris")


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


# --- knobs for tasks that inform at 270M (issue 24) ----------------------------------------

# sha256 of generate(...) as main e4c8e17 wrote it, before held_out_kinds existed.
_SQL_BEFORE_KNOBS = {
    (60, 25, 7): "44a64ad9c6bcdab65fe4e42e9939c281522ce0d3525beb642766e850d773b580",
    (10, None, 0): "78a75c4f5634575f989e077135fde35fb11e84467c0c28ec543574a149e73062",
}


@pytest.mark.parametrize("size,eval_size,seed", sorted(_SQL_BEFORE_KNOBS, key=str))
def test_sql_without_held_out_kinds_writes_the_same_records_as_before(size, eval_size, seed):
    for options in ({}, {"held_out_kinds": ()}):
        train, evals = _offline_sql.generate(size=size, eval_size=eval_size, seed=seed,
                                             **options)
        blob = json.dumps([train, evals], sort_keys=True).encode()
        assert hashlib.sha256(blob).hexdigest() == _SQL_BEFORE_KNOBS[size, eval_size, seed]


def test_sql_held_out_kinds_never_train_and_are_marked_in_evaluation():
    held = ("join_top", "above_average", "having")
    data = load_task("sql", "offline", size=120, eval_size=300, seed=3,
                     offline_options={"held_out_kinds": held})
    assert (len(data.train), len(data.eval)) == (120, 300)
    assert not {r["query_kind"] for r in data.train} & set(held)
    assert {r["query_kind"] for r in data.eval} == set(SQL_KINDS)  # evaluation: every kind
    for record in data.eval:
        assert record["held_out_kind"] == (record["query_kind"] in held)
    train_keys = {(r["sql_prompt"], r["sql_context"]) for r in data.train}
    assert not train_keys & {(r["sql_prompt"], r["sql_context"]) for r in data.eval}
    # The evaluation split keeps the natural mix: about 3 of 19 kinds are held out.
    share = sum(r["held_out_kind"] for r in data.eval) / len(data.eval)
    assert 0.08 < share < 0.25, share


def test_offline_options_are_checked_by_name_and_source():
    with pytest.raises(ValueError, match=r"\['held_out'\] not known for offline sql; it takes "
                                         "held_out_kinds"):
        load_task("sql", "offline", size=10, offline_options={"held_out": ("count",)})
    with pytest.raises(ValueError, match="unknown query kind"):
        load_task("sql", "offline", size=10, offline_options={"held_out_kinds": ("counts",)})
    with pytest.raises(ValueError, match="a tuple of kind names"):
        load_task("sql", "offline", size=10, offline_options={"held_out_kinds": "count"})
    with pytest.raises(ValueError, match="every single-table kind"):
        load_task("sql", "offline", size=10,
                  offline_options={"held_out_kinds": _offline_sql.SINGLE_TABLE_KINDS})
    with pytest.raises(ValueError, match="source 'offline' only"):
        load_task("med", "somewhere/medmcqa", offline_options={"known_only": False})
    assert load_task("fact", "offline", size=4, offline_options={"anchors": False}).train == \
        load_task("fact", "offline", size=4).eval


def test_offline_med_records_answer_with_the_option_text():
    data = load_task("med", "offline", size=30, seed=0)
    assert {r["answer_style"] for r in data.train + data.eval} == {"option_text"}
    assert offline_option_names("med") == ("known_only",)


def test_forgetting_probe_is_fixed_known_and_balanced_over_families():
    probe = forgetting_probe(400, seed=0)
    assert probe == forgetting_probe(400, seed=0) and probe != forgetting_probe(400, seed=1)
    assert len({f.cloze for f in probe}) == 400
    known = _offline_mcq.known_clozes()
    by_cloze = {f.cloze: f for f in _offline_mcq.candidates()}
    for fact in probe:
        assert fact.cloze in known
        source = by_cloze[fact.cloze]
        assert (fact.completion, fact.answer, fact.family) == (
            source.completion, source.answer, source.family)
    known_per_family = collections.Counter(by_cloze[c].family for c in known)
    counts = collections.Counter(f.family for f in probe)
    # Round-robin: a family gives all it has, or at least as many as any other family gives.
    for family, count in counts.items():
        assert count == known_per_family[family] or count >= max(counts.values()) - 1
    assert set(counts) == set(known_per_family)
    assert forgetting_probe(16, seed=0) == probe[:16]
    with pytest.raises(ValueError, match="n must be in 1.."):
        forgetting_probe(len(known) + 1)
