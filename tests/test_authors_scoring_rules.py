"""Every rule of the authors' extraction and scoring (`molf_jax.eval._authors_*`), one case each
that breaks when the rule changes. `test_authors_protocol.py` runs them end to end on the
fixtures; here each rule is pinned on its own."""

import numpy as np
import pytest

from molf_jax.eval import (
    FactQuery,
    authors_exact_match,
    authors_execute,
    authors_extract_sql,
    authors_fact_queries,
    authors_fact_scores,
    authors_med_metrics,
    authors_option_letter,
    authors_probabilities,
    authors_results_match,
    authors_sql_metrics,
)
from molf_jax.eval._authors_fact import uses_bf16_softmax

# ---- Med: their letter extractor and accuracy ----


@pytest.mark.parametrize("generation, letter", [
    ("\tC  \n", "C"),          # stripped on both sides, then one character
    ("d", "D"),                # any case, returned upper-case
    ("c)", "C"), ("A\nB", "A"), ("b.", "B"),   # a letter then ")", newline or "."
    ("B:", None), ("B,", None), ("B )", None), ("BC", None),   # any other second character
    ("E", None), ("E)", None),  # only A-D
    ("(B)", None), ("x B.", None),  # only at the start
    ("", None), ("  ", None),
])
def test_their_letter_is_one_character_or_a_letter_then_a_closing_mark(generation, letter):
    assert authors_option_letter(generation) == letter


def test_their_med_accuracy_is_x100_over_all_rows_with_invalid_answers_counted_wrong():
    records = [{"cop": 0}, {"cop": 1}, {"cop": 2}, {"cop": 3}]   # 0-based: A, B, C, D
    metrics = authors_med_metrics([" A", " B.", " x", " C"], records)
    assert metrics == {"authors_accuracy": {"value": 50.0, "n": 4},
                       "authors_invalid_answers": {"value": 1, "n": 4}}


# ---- Fact: queries, probabilities and scores ----


class TableTokenizer:
    """Encodes only the exact strings it knows, so the text the scorer asks for is pinned."""

    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": list(self.table[text])}


def _record(prompt="{} speaks", subject=" Ann ", new="English", true="French",
            paraphrases=(), neighbours=()):
    return {"requested_rewrite": {"prompt": prompt, "subject": subject,
                                  "target_new": {"str": new}, "target_true": {"str": true}},
            "paraphrase_prompts": list(paraphrases), "neighborhood_prompts": list(neighbours)}


def test_their_queries_use_the_first_token_of_space_plus_the_stripped_target():
    tok = TableTokenizer({" English": [7, 3], " French": [8, 3]})
    records = [_record(prompt=" {} speaks ", subject=" Ann ", new=" English ", true="French",
                       paraphrases=[" Ann talks \n"], neighbours=["  Bob speaks"])]
    queries = authors_fact_queries(records, tok)
    assert [(q.case, q.kind, q.prompt, q.new_id, q.true_id) for q in queries] == [
        (0, "rewrite", "Ann speaks", 7, 8), (0, "paraphrase", "Ann talks", 7, 8),
        (0, "neighborhood", "Bob speaks", 7, 8)]


def test_their_queries_take_missing_prompt_lists_and_refuse_an_empty_target():
    tok = TableTokenizer({" English": [7], " French": [8], " ": []})
    record = _record()
    record["paraphrase_prompts"] = None
    del record["neighborhood_prompts"]
    second = _record(subject="Bo")
    assert [(q.case, q.kind, q.prompt) for q in authors_fact_queries([record, second], tok)] == [
        (0, "rewrite", "Ann speaks"), (1, "rewrite", "Bo speaks")]
    with pytest.raises(ValueError, match="encodes to no tokens"):
        authors_fact_queries([_record(new="  ")], tok)


def test_their_probabilities_are_a_softmax_of_bf16_logits_read_at_the_given_ids():
    logits = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, -1.0]], np.float32)
    ids = np.array([[2, 0], [1, 2]])
    exact = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p = authors_probabilities(logits, ids, bf16_softmax=False)
    np.testing.assert_allclose(p, np.take_along_axis(exact, ids, -1), rtol=1e-6)
    # The logits are rounded to bf16 first: 3.005 is read as 3.0.
    p = authors_probabilities(np.array([[0.0, 3.005]], np.float32), np.array([[1]]),
                              bf16_softmax=False)
    np.testing.assert_allclose(p, [[np.exp(3.0) / (1 + np.exp(3.0))]], rtol=1e-6)
    p = authors_probabilities(logits, ids, bf16_softmax=False)
    # Large logits: the softmax is shifted by the row's maximum, not overflowed.
    big = authors_probabilities(logits + 100.0, ids, bf16_softmax=False)  # exp(103) overflows
    np.testing.assert_allclose(big, p, rtol=1e-6)
    # bf16 probabilities: float32 ones rounded to bf16 (3 significant digits).
    p16 = authors_probabilities(logits, ids, bf16_softmax=True)
    np.testing.assert_allclose(p16, p, rtol=2 ** -8)
    assert not np.array_equal(p16, p)


def test_only_paraphrase_and_neighbourhood_queries_use_the_bf16_softmax():
    kinds = ("rewrite", "paraphrase", "neighborhood")
    assert [uses_bf16_softmax(FactQuery(0, k, "p", (), 1, 2)) for k in kinds] == [
        False, True, True]


def test_their_scores_are_strict_flat_x100_and_neighbourhood_wants_the_true_target():
    q = [FactQuery(0, "rewrite", "p", (), 1, 2), FactQuery(1, "rewrite", "p", (), 1, 2),
         FactQuery(2, "rewrite", "p", (), 1, 2), FactQuery(0, "neighborhood", "p", (), 1, 2),
         FactQuery(0, "neighborhood", "p", (), 1, 2), FactQuery(1, "neighborhood", "p", (), 1, 2)]
    new = np.array([0.6, 0.3, 0.3, 0.6, 0.2, 0.3])
    true = np.array([0.2, 0.3, 0.5, 0.2, 0.6, 0.3])
    scores = authors_fact_scores(q, new, true)
    # Rewrite: win, tie (fails), loss. Neighbourhood: new wins (fails), true wins, tie (fails).
    assert scores == {"authors_efficacy_score": {"value": pytest.approx(100 / 3), "n": 3},
                      "authors_paraphrase_score": {"value": 0.0, "n": 0},
                      "authors_neighborhood_score": {"value": pytest.approx(100 / 3), "n": 3}}


# ---- SQL: their postprocess, exact match, execution and metrics ----


@pytest.mark.parametrize("generation, theirs", [
    ("```SQL\nselect a from t\n```", "SELECT a FROM t;"),      # a fence, any case
    ("```\nselect a from t\n```", "SELECT a FROM t;"),         # a fence without a language
    ("```sql\n# SQL: select a from t\n```", "SELECT a FROM t;"),   # their "# SQL:" marker
    ("select a from t\n\nThis selects a", "SELECT a FROM t;"),     # a blank line ends it
    ("SELECT a FROM t WHERE note = 'UPDATED'", "SELECT a FROM t WHERE note = 'UPDATED';"),
    ("hello world", "hello world;"),                            # no keyword: all of it
    ("select Name from T", "SELECT Name FROM T;"),              # keywords only upper-cased
    ("Sure: delete from t where a = 1;", "DELETE FROM t WHERE a = 1;"),
    ("SELECT a FROM t WHERE id IN (SELECT id FROM u);", "SELECT id FROM u);"),  # the last one
])
def test_their_extractor_rule_by_rule(generation, theirs):
    assert authors_extract_sql(generation) == theirs


CONTEXT = "CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y');"


@pytest.mark.parametrize("statement, rows", [
    ("INSERT INTO t VALUES (3, 'z');", [(1, "x"), (2, "y"), (3, "z")]),
    ("update t SET b = 'w' WHERE a = 2;", [(1, "x"), (2, "w")]),
    ('DELETE FROM "t" WHERE a = 2;', [(1, "x")]),
    ("  SELECT b FROM t WHERE a = 2", [("y",)]),
])
def test_their_execution_reads_dml_from_the_table_it_changed(statement, rows):
    assert authors_execute(CONTEXT, statement) == (True, rows)


def test_their_execution_fails_on_a_broken_context_or_a_runaway_query():
    ran, error = authors_execute("CREATE TABLE (", "SELECT 1")
    assert not ran and "syntax error" in error
    many = "CREATE TABLE n (i INT); INSERT INTO n VALUES " + ",".join(
        f"({i})" for i in range(100)) + ";"
    assert authors_execute(many, "SELECT COUNT(*) FROM n a, n b, n c, n d", max_steps=10_000)[
        0] is False


def test_their_result_comparison_is_by_set_with_none_and_unhashable_rows_handled():
    assert authors_results_match([(1,), (2,)], [(2,), (1,), (1,)])
    assert not authors_results_match([(1,)], [(1,), (2,)])
    assert authors_results_match(None, None) and not authors_results_match(None, [])
    assert authors_results_match([[1, 2]], [[1, 2]]) and not authors_results_match([[1]], [[2]])


def test_their_exact_match_strips_and_upper_cases_only():
    assert authors_exact_match(" select A from T; ", "SELECT a FROM t;\n")
    assert not authors_exact_match("SELECT a FROM t ;", "SELECT a FROM t;")


def test_their_sql_metrics_score_only_rows_whose_gold_runs_and_need_the_prediction_to_run():
    rows = [
        {"sql_context": CONTEXT, "sql": "  SELECT a FROM t;  "},   # gold stripped: exact
        {"sql_context": CONTEXT, "sql": "SELECT b FROM t WHERE a = 1;"},  # rows match only
        {"sql_context": CONTEXT, "sql": "SELECT a FROM t;"},   # prediction fails to run
        {"sql": "SELECT 1;"},                                  # no context: ran on nothing
        {"sql_context": CONTEXT, "sql": "SELECT nope FROM t;"},    # gold fails: left out
    ]
    generations = ["select a from t", "SELECT 'x' FROM t WHERE a = 1", "SELECT zz FROM t",
                   "SELECT 1", "SELECT a FROM t;"]
    metrics = authors_sql_metrics(generations, rows)
    assert metrics == {"authors_exact_match": {"value": 0.5, "n": 4},
                       "authors_execution_accuracy": {"value": 0.75, "n": 4},
                       "authors_gold_failed": {"value": 1, "n": 5}}
