"""Metric logic with known answers: SQL, multiple choice, CounterFact scores, result files."""

import csv
import json
import os

import numpy as np
import pytest

from molf_jax.data import load_task
from molf_jax.eval import (
    FactQuery,
    append_result_row,
    execute_sql,
    extract_sql,
    fact_scores,
    first_option_letter,
    med_metrics,
    normalize_sql,
    sql_metrics,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SQL = load_task("sql", os.path.join(FIXTURES, "synthetic_text_to_sql"))


def test_sql_perfect_predictions_score_one():
    records = SQL.eval
    metrics = sql_metrics([r["sql"] for r in records], records)
    assert metrics["exact_match"] == {"value": 1.0, "n": 2}
    assert metrics["execution_accuracy"] == {"value": 1.0, "n": 2}
    assert metrics["execution_gold_failed"] == {"value": 0, "n": 2}


def test_sql_wrong_and_unexecutable_predictions_score_zero():
    records = SQL.eval
    wrong = ["SELECT title FROM books WHERE year > 1900;",  # runs, different rows
             "SELEC clinic FROM visits"]  # does not run
    metrics = sql_metrics(wrong, records)
    assert metrics["exact_match"]["value"] == 0.0
    assert metrics["execution_accuracy"] == {"value": 0.0, "n": 2}


def test_sql_normalisation_and_execution_equivalence():
    records = SQL.eval
    reformatted = ["select   TITLE\nfrom books where year > 2000", records[1]["sql"]]
    assert sql_metrics(reformatted, records)["exact_match"]["value"] == 1.0
    # Same rows from a different query: wrong by exact match, right by execution.
    equivalent = ["SELECT title FROM books WHERE year >= 2001;",
                  "SELECT clinic, COUNT(id) FROM visits GROUP BY clinic ORDER BY clinic DESC;"]
    metrics = sql_metrics(equivalent, records)
    assert metrics["exact_match"]["value"] == 0.0
    assert metrics["execution_accuracy"]["value"] == 1.0


def test_sql_gold_failing_row_is_skipped_and_reported():
    records = SQL.train  # row 0: "ambiguous column name" in sqlite
    metrics = sql_metrics([r["sql"] for r in records], records)
    assert metrics["execution_gold_failed"] == {"value": 1, "n": 3}
    assert metrics["execution_accuracy"] == {"value": 1.0, "n": 2}
    assert metrics["exact_match"] == {"value": 1.0, "n": 3}


def test_sql_statements_compare_table_contents():
    delete = SQL.train[1]  # DELETE FROM exhibitions WHERE end_year < 2020;
    assert execute_sql(delete["sql_context"], delete["sql"])[0] == "tables"
    same = ["DELETE FROM exhibitions WHERE end_year <= 2019"]
    other = ["DELETE FROM exhibitions WHERE end_year < 2019"]
    assert sql_metrics(same, [delete])["execution_accuracy"]["value"] == 1.0
    assert sql_metrics(other, [delete])["execution_accuracy"]["value"] == 0.0


def test_sql_row_order_matters_only_with_order_by():
    context = "CREATE TABLE t (a INT); INSERT INTO t VALUES (1), (2), (3);"
    unordered = {"sql_context": context, "sql": "SELECT a FROM t;"}
    ordered = {"sql_context": context, "sql": "SELECT a FROM t ORDER BY a DESC;"}
    reversed_rows = "SELECT a FROM t ORDER BY a ASC"
    assert sql_metrics([reversed_rows], [unordered])["execution_accuracy"]["value"] == 1.0
    assert sql_metrics([reversed_rows], [ordered])["execution_accuracy"]["value"] == 0.0


def test_sql_rows_compare_as_a_multiset_so_distinct_and_duplicates_differ():
    context = "CREATE TABLE t (a INT); INSERT INTO t VALUES (1), (2), (2);"
    duplicates = {"sql_context": context, "sql": "SELECT a FROM t;"}
    distinct = {"sql_context": context, "sql": "SELECT DISTINCT a FROM t;"}
    assert sql_metrics(["SELECT DISTINCT a FROM t"], [duplicates])[
        "execution_accuracy"]["value"] == 0.0
    assert sql_metrics(["SELECT a FROM t"], [distinct])["execution_accuracy"]["value"] == 0.0
    # Same multiset in another order (no ORDER BY): right.
    assert sql_metrics(["SELECT a FROM t ORDER BY a DESC"], [duplicates])[
        "execution_accuracy"]["value"] == 1.0


def test_sql_runaway_and_multi_statement_predictions_are_wrong():
    context = ("CREATE TABLE t (a INT); INSERT INTO t VALUES " +
               ", ".join(f"({i})" for i in range(200)) + ";")
    record = {"sql_context": context, "sql": "SELECT COUNT(*) FROM t;"}
    runaway = "SELECT COUNT(*) FROM t x, t y, t z, t w"
    assert sql_metrics([runaway], [record])["execution_accuracy"]["value"] == 0.0
    two = "SELECT COUNT(*) FROM t; DELETE FROM t;"
    assert sql_metrics([two], [record])["execution_accuracy"]["value"] == 0.0


def test_extract_and_normalize_sql():
    assert extract_sql(" SELECT a FROM t;\n\nThis query selects a.") == "SELECT a FROM t;"
    assert extract_sql("SELECT a\nFROM t ### Instruction:") == "SELECT a\nFROM t"
    assert normalize_sql("  SELECT\ta ,b FROM T;; ") == "select a ,b from t"


def test_first_option_letter():
    assert first_option_letter(" B") == "B"
    assert first_option_letter(" (d) or D. Neutrophilia") == "D"
    assert first_option_letter("DNA is C") == "C"
    # The first letter, not the last: the model's answer, then its reasoning about another.
    assert first_option_letter(" B, since A and C are wrong") == "B"
    assert first_option_letter("A\nQuestion: which is D?") == "A"
    assert first_option_letter(" none of these") is None


def test_med_accuracy_perfect_wrong_and_unparsed():
    records = [{"cop": 0}, {"cop": 3}, {"cop": 1}]
    assert med_metrics([" A, not C", " D, or B", " B; D is a distractor"], records)[
        "accuracy"] == {"value": 1.0, "n": 3}
    assert med_metrics([" A", " D.", " B because"], records)["accuracy"] == {"value": 1.0, "n": 3}
    assert med_metrics([" B", " A", " C"], records)["accuracy"]["value"] == 0.0
    metrics = med_metrics([" A", "???", " B"], records)
    assert metrics["accuracy"]["value"] == pytest.approx(2 / 3)
    assert metrics["no_letter"] == {"value": 1, "n": 3}


def _queries(kinds_per_case):
    return [FactQuery(case, kind, f"{case}-{kind}", (), 1, 2)
            for case, kinds in enumerate(kinds_per_case) for kind in kinds]


def test_fact_scores_known_answers():
    queries = _queries([
        ["rewrite", "paraphrase", "paraphrase", "neighborhood", "neighborhood"],
        ["rewrite", "paraphrase", "neighborhood"],
    ])
    # case 0: new wins on rewrite, one of two paraphrases, and one of two neighbours.
    # case 1: true wins everywhere.
    new = np.array([3.0, 2.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0])
    true = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    scores = fact_scores(queries, new, true, num_cases=3, skipped=1)
    assert scores["efficacy_score"] == {"value": 0.5, "n": 2}
    assert scores["paraphrase_score"] == {"value": 0.25, "n": 2}  # mean(0.5, 0.0)
    assert scores["neighborhood_score"] == {"value": 0.75, "n": 2}  # mean(0.5, 1.0)
    assert scores["skipped_target_prefix"] == {"value": 1, "n": 3}


def test_fact_ties_are_failures_for_both_directions():
    queries = _queries([["rewrite", "neighborhood"]])
    scores = fact_scores(queries, np.zeros(2), np.zeros(2), num_cases=1, skipped=0)
    assert scores["efficacy_score"]["value"] == 0.0
    assert scores["neighborhood_score"]["value"] == 0.0


ROW = {"model": "m", "task": "med", "metric": "accuracy", "value": 0.5, "n": 4, "seconds": 1.5}


def test_append_result_row_csv(tmp_path):
    path = str(tmp_path / "out" / "results.csv")
    append_result_row(path, ROW)
    append_result_row(path, {**ROW, "metric": "no_letter", "value": 1})
    rows = list(csv.DictReader(open(path)))
    assert [r["metric"] for r in rows] == ["accuracy", "no_letter"]
    assert rows[0] == {"model": "m", "task": "med", "metric": "accuracy", "value": "0.5",
                       "n": "4", "seconds": "1.5"}
    with pytest.raises(ValueError, match="CSV takes only"):
        append_result_row(path, {**ROW, "note": "x"})


def test_append_result_row_jsonl_and_errors(tmp_path):
    path = str(tmp_path / "results.jsonl")
    append_result_row(path, {**ROW, "source": "offline"})
    append_result_row(path, ROW)
    lines = [json.loads(line) for line in open(path)]
    assert lines[0] == {**ROW, "source": "offline"} and lines[1] == ROW
    with pytest.raises(ValueError, match="missing field"):
        append_result_row(path, {"model": "m"})
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        append_result_row(str(tmp_path / "results.txt"), ROW)
