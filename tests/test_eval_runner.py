"""evaluate_task end to end: fake generators with known answers, a tiny JAX model, the CLI."""

import argparse
import os

import jax
import numpy as np
import pytest

from molf_jax.data import (
    OPTION_LETTERS,
    byte_level_tokenizer,
    load_task,
    med_prompt,
    prompt_ids,
    sql_example,
)
from molf_jax.eval import evaluate_task, fact_queries, left_pad, prompt_batches
from molf_jax.cli.eval import register

TOK = byte_level_tokenizer()
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _answering(answers_by_prompt, *, seen=None, new_tokens=12):
    """A fake generate_fn: looks up each row's prompt and 'generates' the given answer."""

    def generate(input_ids, attention_mask):
        assert input_ids.dtype == np.int32 and input_ids.shape == attention_mask.shape
        out = np.full((len(input_ids), new_tokens), TOK.pad_token_id, np.int32)
        for b, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            n = int(mask.sum())
            assert mask[-n:].all() and not mask[:-n].any()  # left padding
            prompt = TOK.decode(ids[-n:], skip_special_tokens=True)
            if seen is not None:
                seen.append(prompt)
            answer = TOK(answers_by_prompt[prompt], add_special_tokens=False)["input_ids"]
            answer = (answer + [TOK.eos_token_id])[:new_tokens]
            out[b, : len(answer)] = answer
        return out

    return generate


@pytest.mark.parametrize("source", ["fixture", "offline"])
def test_sql_gold_generations_score_one_and_wrong_ones_zero(source):
    if source == "fixture":
        records = load_task("sql", os.path.join(FIXTURES, "synthetic_text_to_sql")).eval
    else:
        records = load_task("sql", "offline", size=10, seed=0).eval
    prompts = [sql_example(r).prompt for r in records]
    gold = {p: r["sql"] for p, r in zip(prompts, records)}
    metrics = evaluate_task("sql", None, None, TOK, records, batch_size=3,
                            generate_fn=_answering(gold, new_tokens=200))
    assert metrics["exact_match"] == {"value": 1.0, "n": len(records)}
    assert metrics["execution_accuracy"] == {"value": 1.0, "n": len(records)}
    wrong = {p: "SELECT nothing FROM nowhere;" for p in prompts}
    metrics = evaluate_task("sql", None, None, TOK, records, batch_size=3,
                            generate_fn=_answering(wrong, new_tokens=200))
    assert metrics["exact_match"]["value"] == metrics["execution_accuracy"]["value"] == 0.0


def test_med_gold_letters_score_one_every_prompt_once():
    # Nine offline Med facts in MedMCQA's form (answered with a letter: no answer_style).
    records = [{k: v for k, v in r.items() if k != "answer_style"}
               for r in load_task("med", "offline", size=9, seed=1).eval[:9]]
    gold = {med_prompt(r): " " + OPTION_LETTERS[r["cop"]] + ". because" for r in records}
    seen = []
    metrics = evaluate_task("med", None, None, TOK, records, batch_size=4,
                            generate_fn=_answering(gold, seen=seen))
    assert metrics["accuracy"] == {"value": 1.0, "n": 9}
    # 9 prompts in 3 fixed-size batches: the last batch repeats a prompt as filler.
    assert len(seen) == 12 and set(seen) == set(gold)
    shifted = {p: " " + OPTION_LETTERS[(r["cop"] + 1) % 4] for p, r in zip(gold, records)}
    assert evaluate_task("med", None, None, TOK, records, batch_size=4,
                         generate_fn=_answering(shifted))["accuracy"]["value"] == 0.0


def test_fact_scores_follow_which_target_the_model_prefers():
    records = load_task("fact", "offline", size=12, seed=2).eval
    queries, skipped = fact_queries(records, TOK)
    assert skipped == 0

    def preferring(which):
        wanted = {}
        for q in queries:
            key = tuple(prompt_ids(TOK, q.prompt) + list(q.prefix))
            wanted[key] = q.new_id if which == "new" else q.true_id

        def logits_fn(input_ids, attention_mask):
            out = np.zeros((len(input_ids), len(TOK)), np.float32)
            for b, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
                out[b, wanted[tuple(ids[mask == 1].tolist())]] = 1.0
            return out

        return logits_fn

    edited = evaluate_task("fact", None, None, TOK, records, batch_size=5,
                           next_token_logits_fn=preferring("new"))
    assert edited["efficacy_score"] == {"value": 1.0, "n": 12}
    assert edited["paraphrase_score"] == {"value": 1.0, "n": 12}
    assert edited["neighborhood_score"] == {"value": 0.0, "n": 12}
    unedited = evaluate_task("fact", None, None, TOK, records, batch_size=5,
                             next_token_logits_fn=preferring("true"))
    assert unedited["efficacy_score"]["value"] == 0.0
    assert unedited["neighborhood_score"]["value"] == 1.0


def test_prompt_batches_are_length_sorted_left_padded_and_full():
    token_lists = [[5] * n for n in (7, 2, 40, 3, 9)]
    batches = list(prompt_batches(token_lists, batch_size=2, pad_id=0, pad_to_multiple_of=8))
    assert [index for index, _, _ in batches] == [[1, 3], [0, 4], [2]]
    assert [ids.shape for _, ids, _ in batches] == [(2, 8), (2, 16), (2, 40)]
    for _, ids, mask in batches:
        assert mask[:, -1].all() and (ids[mask == 0] == 0).all()
    ids, mask = left_pad([[7, 8]], pad_id=0, length=4)
    assert ids.tolist() == [[0, 0, 7, 8]] and mask.tolist() == [[0, 0, 1, 1]]


# --- a tiny JAX model through the default (JAX) paths -------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    from molf_jax.models import Qwen2Config, abstract_params, build_model

    config = Qwen2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=64,
                         num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                         tie_word_embeddings=True)
    model = build_model(config)
    # Random weights larger than HF's init, so greedy outputs vary with the prompt.
    leaves, tree = jax.tree.flatten(abstract_params(model))
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(
        tree, [np.asarray(rng.normal(size=x.shape) * 0.5, x.dtype) for x in leaves])
    return model, params


def test_batched_jax_generation_matches_one_prompt_at_a_time(tiny_model):
    from molf_jax.generation import greedy_generate

    model, params = tiny_model
    records = load_task("med", "offline", size=3, seed=3).eval[:3]
    texts = []

    def recording(input_ids, attention_mask):
        out = greedy_generate(model, params, input_ids, attention_mask, max_new_tokens=6,
                              eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
        for ids, mask, row in zip(input_ids, attention_mask, out):
            texts.append((TOK.decode(ids[mask == 1], skip_special_tokens=True), row.tolist()))
        return out

    batched = evaluate_task("med", model, params, TOK, records, batch_size=2,
                            max_new_tokens=6, generate_fn=recording)
    default = evaluate_task("med", model, params, TOK, records, batch_size=2, max_new_tokens=6)
    assert batched == default
    assert len(texts) == 4  # two batches of two rows, the last one a filler
    assert len({prompt for prompt, _ in texts[:3]}) == 3
    for prompt, row in texts[:3]:  # every prompt, unpadded and alone
        ids = np.asarray([prompt_ids(TOK, prompt)], np.int32)
        alone = greedy_generate(model, params, ids, np.ones_like(ids), max_new_tokens=6,
                                eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
        assert alone[0].tolist() == row


def test_jax_fact_logits_match_a_right_padded_forward_pass(tiny_model):
    model, params = tiny_model
    records = load_task("fact", "offline", size=2, seed=4).eval
    queries, _ = fact_queries(records, TOK)
    rows = [prompt_ids(TOK, q.prompt) + list(q.prefix) for q in queries]
    # Reference: one right-padded batch, logits read at each row's last real token.
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    logits = model.apply({"params": params}, ids, (ids != 0).astype(np.int32))
    wins = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    for q, row, row_logits in zip(queries, rows, np.asarray(logits)):
        last = row_logits[len(row) - 1]
        new_wins = bool(last[q.new_id] > last[q.true_id])
        wins[q.kind].append(new_wins if q.kind != "neighborhood" else not new_wins)
    metrics = evaluate_task("fact", model, params, TOK, records, batch_size=8)
    # Each case has 1 rewrite, 2 paraphrase and 5 neighbour prompts, so the mean of case
    # means equals the mean over prompts.
    for kind, name in (("rewrite", "efficacy_score"), ("paraphrase", "paraphrase_score"),
                       ("neighborhood", "neighborhood_score")):
        assert metrics[name] == {"value": pytest.approx(np.mean(wins[kind])), "n": 2}
    assert 0.0 < np.mean(wins["rewrite"] + wins["paraphrase"] + wins["neighborhood"]) < 1.0


def test_eval_command_registers_its_arguments():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--model", "runs/m", "--task", "sql", "--size", "50",
                              "--results", "r.csv", "--no-sql-context", "--limit", "5"])
    assert (args.task, args.size, args.results, args.no_sql_context, args.limit) == (
        "sql", 50, "r.csv", True, 5)
    assert args.func.__name__ == "main" and args.func.__module__ == "molf_jax.cli.eval"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--task", "math"])
    assert parser.parse_args(["eval", "--model", "m"]).task is None  # the run's, if a run


def test_eval_of_a_folder_outside_a_run_needs_the_task(tmp_path, capsys):
    from molf_jax.cli import main as cli_main

    (tmp_path / "config.json").write_text("{}")
    assert cli_main(["eval", "--model", str(tmp_path)]) == 2
    assert f"--task is required: --model {tmp_path} is not a run directory" in \
        capsys.readouterr().err
    assert cli_main(["eval", "--model", str(tmp_path / "run")]) == 2


@pytest.fixture(scope="module")
def tiny_run_dir(tiny_model, tmp_path_factory):
    """A run directory as molf-jax train leaves it, for what eval reads: run_config.json (a fact
    run on 3 generated cases, seed 5, scoring 2) and the merged folder."""
    import json

    from molf_jax.checkpoints import save_hf
    from molf_jax.train import TrainConfig

    model, params = tiny_model
    run = tmp_path_factory.mktemp("evalrun") / "fact_run"
    save_hf(run / "merged", params, model.config, tokenizer=TOK)
    config = TrainConfig(task="fact", task_size=3, seed=5, eval_limit=2, out_dir=str(run))
    (run / "run_config.json").write_text(json.dumps(config.to_dict()))
    return run


@pytest.mark.parametrize("where", ["merged", "run"])
def test_eval_of_a_run_scores_the_cases_it_trained_on(tiny_model, tiny_run_dir, where, capsys):
    import json

    from molf_jax.cli import main as cli_main

    model, params = tiny_model
    folder = tiny_run_dir / "merged" if where == "merged" else tiny_run_dir
    assert cli_main(["eval", "--model", str(folder)]) == 0
    out, err = capsys.readouterr()
    records = load_task("fact", size=3, seed=5).eval[:2]
    assert records != load_task("fact", size=48, seed=0).eval[:2]  # other cases than the defaults
    assert json.loads(out)["metrics"] == evaluate_task("fact", model, params, TOK, records)
    assert f"the cases of the run {tiny_run_dir} (task fact, source offline, protocol " \
        "molf_jax, size 3, seed 5, limit 2" in err
    assert json.loads(out)["model"] == "fact_run"
    # A flag still wins over the run's setting.
    assert cli_main(["eval", "--model", str(folder), "--size", "4", "--limit", "1"]) == 0
    expected = evaluate_task("fact", model, params, TOK, load_task("fact", size=4, seed=5).eval[:1])
    assert json.loads(capsys.readouterr().out)["metrics"] == expected


def test_eval_of_a_run_without_its_merged_folder_says_how_to_write_it(tmp_path, capsys):
    from molf_jax.cli import main as cli_main

    (tmp_path / "run_config.json").write_text("{}")
    assert cli_main(["eval", "--model", str(tmp_path)]) == 2
    assert f"molf-jax export {tmp_path}" in capsys.readouterr().err


def test_eval_command_scores_an_hf_folder_and_appends_rows(tiny_model, tmp_path, capsys):
    import csv
    import json

    from molf_jax.checkpoints import save_hf

    model, params = tiny_model
    folder = save_hf(tmp_path / "tiny", params, model.config, tokenizer=TOK)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    results = tmp_path / "results.csv"
    args = parser.parse_args(["eval", "--model", str(folder), "--task", "fact", "--size", "2",
                              "--batch-size", "8", "--results", str(results)])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate_task("fact", model, params, TOK, load_task("fact", size=2).eval)
    assert printed["metrics"] == expected
    rows = list(csv.DictReader(open(results)))
    assert [(r["model"], r["task"], r["metric"]) for r in rows] == [
        ("tiny", "fact-offline", m) for m in expected]
    assert [float(r["value"]) for r in rows] == [m["value"] for m in expected.values()]
