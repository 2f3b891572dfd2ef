"""The authors' protocol: their templates, tokens and scoring, pinned on the hub-format fixtures
and on the example strings of the shared side-by-side (authors_protocol.md)."""

import os

import numpy as np
import pytest
from tokenizers.processors import TemplateProcessing

from molf_jax.data import (
    PROTOCOL_SETTINGS,
    byte_level_tokenizer,
    encode_records,
    eval_prompt,
    eval_prompt_ids,
    load_task,
    render_example,
    resolve_protocol,
)
from molf_jax.eval import (
    FactQuery,
    authors_exact_match,
    authors_execute,
    authors_extract_sql,
    authors_fact_queries,
    authors_fact_scores,
    authors_option_letter,
    authors_probabilities,
    authors_results_match,
    evaluate_task,
    first_option_letter,
    paper_comparison,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SQL = load_task("sql", os.path.join(FIXTURES, "synthetic_text_to_sql"), protocol="authors")
MED = load_task("med", os.path.join(FIXTURES, "medmcqa"), protocol="authors")
FACT = load_task("fact", os.path.join(FIXTURES, "counterfact.json"), protocol="authors")
BYTES = byte_level_tokenizer()


def gemma_like_tokenizer():
    """The byte-level tokenizer with Gemma's habit: ``tokenizer(text)`` puts ``<bos>`` first."""
    tok = byte_level_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def test_the_authors_protocol_is_used_only_when_asked_for():
    """A user's own file or a hub dataset trains as the library does unless --protocol authors
    is given (their protocol trains Gemma without BOS)."""
    assert (SQL.protocol, MED.protocol, FACT.protocol) == ("authors",) * 3
    for task, source in (("sql", "synthetic_text_to_sql"), ("med", "medmcqa"),
                         ("fact", "counterfact.json")):
        assert load_task(task, os.path.join(FIXTURES, source)).protocol == "molf_jax"
    assert load_task("med", "offline", size=4).protocol == "molf_jax"
    assert resolve_protocol(None) == "molf_jax"
    assert resolve_protocol("authors") == "authors"
    with pytest.raises(ValueError, match="unknown protocol 'paper'"):
        resolve_protocol("paper")


def test_sql_template_is_theirs_with_instruction_input_and_context_blocks():
    record = SQL.eval[0]
    example = render_example("sql", record, protocol="authors")
    assert example.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWrite a SQL query to answer the question.\n\n"
        "### Input:\nList the titles of books published after 2000.\n\n"
        "### Context:\nCREATE TABLE books (id INT, title TEXT, year INT); INSERT INTO books "
        "(id, title, year) VALUES (1, 'Dune', 1965), (2, 'Atonement', 2001), (3, 'Gilead', "
        "2004);\n\n### Response:\n")
    assert (example.target, example.add_eos) == ("SELECT title FROM books WHERE year > 2000;", True)


def test_sql_rows_with_a_blank_schema_are_kept_and_use_their_no_context_template(tmp_path):
    path = tmp_path / "sql.jsonl"
    path.write_text('{"sql_prompt": " Say one. ", "sql_context": " ", "sql": "SELECT 1;"}\n'
                    '{"sql_prompt": "Say two.", "sql_context": "", "sql": "SELECT 2;"}\n')
    theirs = load_task("sql", str(path), eval_split="train", protocol="authors")
    assert len(theirs.train) == 2 and theirs.dropped == {}
    assert render_example("sql", theirs.train[0], protocol="authors").prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWrite a SQL query to answer the question."
        "\n\n### Input:\nSay one.\n\n### Response:\n")
    with pytest.raises(ValueError, match="no usable rows"):
        load_task("sql", str(path), eval_split="train", protocol="molf_jax")


def test_med_template_is_theirs_and_the_eval_prompt_starts_with_a_newline():
    record = MED.train[1]
    train = render_example("med", record, protocol="authors")
    assert train.prompt == (
        "Answer the medical question below by choosing the correct option letter.\n"
        "Question: Which vitamin deficiency causes scurvy?\nOptions:\nA) Vitamin A\n"
        "B) Vitamin B12\nC) Vitamin C\nD) Vitamin D\nAnswer:")
    assert (train.target, train.add_eos) == (" C", True)
    assert eval_prompt("med", record, protocol="authors") == "\n" + train.prompt
    # Ours is unchanged: no instruction, no "Options:", "A." letters, same prompt at eval.
    assert eval_prompt("med", record) == render_example("med", record).prompt
    assert render_example("med", record).prompt.splitlines()[1] == "A. Vitamin A"


def test_fact_prompt_is_stripped_and_the_target_ends_with_eos():
    example = render_example("fact", FACT.train[0], protocol="authors")
    assert (example.prompt, example.target, example.add_eos) == (
        "The mother tongue of Danielle Darrieux is", " English", True)
    assert render_example("fact", FACT.train[0]).add_eos is False


@pytest.mark.parametrize("task, data", [("sql", SQL), ("med", MED), ("fact", FACT)])
def test_gemma_trains_without_bos_and_is_evaluated_with_it(task, data):
    tok = gemma_like_tokenizer()
    record = data.train[1]
    [theirs], _ = encode_records(task, [record], tok, protocol="authors")
    [ours], _ = encode_records(task, [record], tok)
    example = render_example(task, record, protocol="authors")
    prompt = tok(example.prompt, add_special_tokens=False)["input_ids"]
    target = tok(example.target, add_special_tokens=False)["input_ids"]
    # Theirs: prompt + target + EOS, no BOS, loss on the target and EOS.
    assert theirs.input_ids.tolist() == prompt + target + [tok.eos_token_id]
    assert theirs.loss_mask.tolist() == [0] * len(prompt) + [1] * (len(target) + 1)
    assert ours.input_ids[0] == tok.bos_token_id
    text = eval_prompt(task, record, protocol="authors")
    assert eval_prompt_ids(tok, text, protocol="authors")[0] == tok.bos_token_id
    # A tokenizer that adds nothing by itself (Qwen2.5 has no BOS) gets nothing at eval either.
    assert eval_prompt_ids(BYTES, text, protocol="authors") == BYTES(
        text, add_special_tokens=False)["input_ids"]


def test_the_authors_protocol_has_no_length_cap_and_random_batches():
    from molf_jax.train.config import ConfigError, TrainConfig
    from molf_jax.train.loop import prepare_data

    source = os.path.join(FIXTURES, "synthetic_text_to_sql")
    theirs = TrainConfig(task="sql", source=source, protocol="authors")
    ours = TrainConfig(task="sql", source=source)
    assert (theirs.data_protocol, theirs.length_cap, ours.length_cap) == ("authors", None, 256)
    kept, _ = prepare_data(theirs, BYTES)
    # Byte tokens: every fixture row is over 256 long; the authors drop and cut none of them.
    assert len(kept) == len(SQL.train) and min(len(e) for e in kept) > 256
    with pytest.raises(ConfigError, match="all longer than --max-length"):
        prepare_data(ours, BYTES)
    assert PROTOCOL_SETTINGS["authors"].bucket_batches == 1
    assert PROTOCOL_SETTINGS["molf_jax"].bucket_batches == 32


# The extractors on the example strings of the side-by-side.
@pytest.mark.parametrize("generation, theirs", [
    ("SELECT name FROM t WHERE id IN (SELECT id FROM u);", "SELECT id FROM u);"),
    ("WITH x AS (SELECT a FROM t) SELECT a FROM x;", "SELECT a FROM x;"),
    ("SELECT a FROM t UNION SELECT a FROM u;", "SELECT a FROM u;"),
    # sqlparse upper-cases the keyword it now starts with.
    ("SELECT * FROM t WHERE title = 'Living with HIV';", "WITH HIV';"),
    ("SELECT REPLACE(name, 'a', 'b') FROM t;", "REPLACE(name, 'a', 'b') FROM t;"),
    ("select a from t where b = 'x;y';\n\nmore", "SELECT a FROM t WHERE b = 'x;"),
    ("Here:\n```sql\nselect a from t\n```", "SELECT a FROM t;"),
])
def test_their_sql_extractor_cuts_at_the_last_keyword_and_the_first_semicolon(generation,
                                                                              theirs):
    assert authors_extract_sql(generation) == theirs


def test_their_exact_match_needs_the_gold_semicolon_and_ignores_only_case():
    assert authors_exact_match("SELECT a FROM t;", " select a from t; ")
    assert not authors_exact_match("SELECT a FROM t;", "SELECT a FROM t")
    assert not authors_exact_match("SELECT a  FROM t;", "SELECT a FROM t;")


def test_their_execution_compares_sets_and_dml_on_the_first_table():
    context = "CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (1, 'x'), (2, 'y'), (2, 'y');"
    gold = authors_execute(context, "SELECT a FROM t ORDER BY a DESC;")
    assert gold == (True, [(2,), (2,), (1,)])
    # Order and duplicates do not count.
    assert authors_results_match(gold[1], authors_execute(context, "SELECT DISTINCT a FROM t")[1])
    deleted = authors_execute(context, "DELETE FROM t WHERE a = 1;")
    assert deleted == (True, [(2, "y"), (2, "y")])
    # Any statement that returns nothing matches a gold that returns nothing.
    assert authors_execute(context, "CREATE TABLE u (c INT);") == (True, [])
    ran, error = authors_execute(context, "SELECT nope FROM t;")
    assert not ran and "no such column" in error


def _answering(answers_by_prompt, tok, *, seen):
    """A fake generate_fn that looks up each row's prompt (decoded without specials)."""

    def generate(input_ids, attention_mask):
        out = np.full((len(input_ids), 300), tok.pad_token_id, np.int32)
        for b, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            row = ids[-int(mask.sum()):].tolist()
            seen.append(row)
            answer = tok(answers_by_prompt[tok.decode(row, skip_special_tokens=True)],
                         add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out[b, : len(answer)] = answer
        return out

    return generate


def test_sql_gold_failures_leave_every_authors_metric_and_the_extractor_costs_a_subquery():
    subquery = {"sql_prompt": "Titles of the newest books.", "sql": "SELECT title FROM books "
                "WHERE year = (SELECT MAX(year) FROM books);", "sql_context": SQL.eval[0][
                    "sql_context"]}
    records = SQL.train + [subquery]   # train[0]'s gold fails in sqlite (ambiguous column)
    tok, seen = gemma_like_tokenizer(), []
    prompts = [eval_prompt("sql", r, protocol="authors") for r in records]
    gold = {p: r["sql"] for p, r in zip(prompts, records)}
    metrics = evaluate_task("sql", None, None, tok, records, batch_size=2, protocol="authors",
                            generate_fn=_answering(gold, tok, seen=seen))
    assert all(row[0] == tok.bos_token_id for row in seen)
    assert metrics["authors_gold_failed"] == {"value": 1, "n": 4}
    # Three rows score; the perfect subquery generation is cut to "SELECT MAX(year) FROM books)".
    assert metrics["authors_exact_match"] == {"value": 2 / 3, "n": 3}
    assert metrics["authors_execution_accuracy"] == {"value": 2 / 3, "n": 3}
    assert metrics["exact_match"] == {"value": 1.0, "n": 4}
    assert metrics["execution_accuracy"] == {"value": 1.0, "n": 3}
    assert paper_comparison("sql", metrics).startswith(
        "paper's metric authors_exact_match 0.6667 (n 3) | ours: exact_match 1.0000 (n 4)")


@pytest.mark.parametrize("generation, theirs, ours", [
    (" B", "B", "B"), (" b", "B", None), (" b.", "B", None), (" B)", "B", "B"),
    (" B\nQuestion: next", "B", "B"), (" B x", None, "B"), (" (B)", None, "B"),
    (" Answer: B", None, "B"), (" E", None, None),
])
def test_their_letter_extractor_reads_only_the_start(generation, theirs, ours):
    assert authors_option_letter(generation) == theirs
    assert first_option_letter(generation) == ours


def test_med_under_the_authors_protocol_scores_x100_on_their_newline_prompts():
    records = MED.eval
    tok, seen = gemma_like_tokenizer(), []
    prompts = [eval_prompt("med", r, protocol="authors") for r in records]
    answers = {prompts[0]: " D. Vitamin K", prompts[1]: " (B)"}   # right; right but invalid
    metrics = evaluate_task("med", None, None, tok, records, batch_size=2, protocol="authors",
                            generate_fn=_answering(answers, tok, seen=seen))
    assert metrics["authors_accuracy"] == {"value": 50.0, "n": 2}
    assert metrics["authors_invalid_answers"] == {"value": 1, "n": 2}
    assert metrics["accuracy"] == {"value": 1.0, "n": 2}
    assert {tok.decode(row[:2]) for row in seen} == {"<bos>\n"}


def test_fact_first_token_ties_fail_and_means_are_flat():
    tok = BYTES   # every " target" starts with the space byte: all first tokens tie
    queries = authors_fact_queries(FACT.eval, tok)
    assert len(queries) == 3 + 4 + 6 and {q.new_id == q.true_id for q in queries} == {True}
    assert queries[0].prompt == "The mother tongue of Danielle Darrieux is"

    def prefers_new(ids, mask):
        logits = np.zeros((len(ids), len(tok)), np.float32)
        for b, row in enumerate(ids):
            # After " " (ours reads the differing token): the new target's letter wins.
            logits[b, [tok(" " + rec["requested_rewrite"]["target_new"]["str"],
                           add_special_tokens=False)["input_ids"][1] for rec in FACT.eval]] = 5.0
        return logits

    metrics = evaluate_task("fact", None, None, tok, FACT.eval, batch_size=4,
                            protocol="authors", next_token_logits_fn=prefers_new)
    assert metrics["authors_efficacy_score"] == {"value": 0.0, "n": 3}
    assert metrics["authors_neighborhood_score"] == {"value": 0.0, "n": 6}
    assert metrics["efficacy_score"] == {"value": 1.0, "n": 3}
    # Flat over prompts: 2 of 4 paraphrase prompts win = 50, while per case 1/2, 1, 0 = 0.5.
    q = [FactQuery(0, "paraphrase", "p", (), 1, 2)] * 2 + [
        FactQuery(1, "paraphrase", "p", (), 1, 2), FactQuery(2, "paraphrase", "p", (), 1, 2)]
    flat = authors_fact_scores(q, np.array([.9, .1, .1, .9]), np.array([.1, .9, .9, .1]))
    assert flat["authors_paraphrase_score"] == {"value": 50.0, "n": 4}


def test_probabilities_tie_on_one_bf16_logit_and_paraphrases_also_on_bf16_probabilities():
    ids = np.array([[1, 0]])
    same_logit = np.array([[3.0, 3.005, 0.0]], np.float32)   # one bf16 value: 3.0
    p = authors_probabilities(same_logit, ids, bf16_softmax=False)
    assert p[0, 0] == p[0, 1]
    # Distinct bf16 logits: float32 probabilities differ (efficacy), bf16 ones tie (paraphrase
    # and neighbourhood), so the same prompt wins for efficacy and fails as a paraphrase.
    close = np.array([[0.28, 0.28390625, 0.0, 0.0, 0.0, 0.0]], np.float32)
    p32 = authors_probabilities(close, ids, bf16_softmax=False)
    p16 = authors_probabilities(close, ids, bf16_softmax=True)
    assert p32[0, 0] > p32[0, 1] and p16[0, 0] == p16[0, 1]
    queries = [FactQuery(0, "rewrite", "p", (), 1, 0), FactQuery(0, "paraphrase", "p", (), 1, 0)]
    scores = authors_fact_scores(queries, np.array([p32[0, 0], p16[0, 0]]),
                                 np.array([p32[0, 1], p16[0, 1]]))
    assert scores["authors_efficacy_score"]["value"] == 100.0
    assert scores["authors_paraphrase_score"]["value"] == 0.0


def test_train_cli_takes_the_protocol_and_rejects_an_unknown_one(capsys):
    import argparse

    from molf_jax import cli
    from molf_jax.cli.train import config_from_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    config = config_from_args(parser.parse_args(
        ["train", "--source", "medmcqa.parquet", "--protocol", "molf_jax"]))
    assert (config.data_protocol, config.length_cap) == ("molf_jax", 256)
    default = config_from_args(parser.parse_args(["train", "--source", "medmcqa.parquet"]))
    assert (default.data_protocol, default.length_cap) == ("molf_jax", 256)
    theirs = config_from_args(parser.parse_args(
        ["train", "--source", "medmcqa.parquet", "--protocol", "authors"]))
    assert (theirs.data_protocol, theirs.length_cap) == ("authors", None)
    assert cli.main(["train", "--protocol", "paper"]) == 2
    assert "unknown protocol 'paper'" in capsys.readouterr().err
