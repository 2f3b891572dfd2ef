"""Offline Med answered with the option's text, and the forgetting probe: generation + text metric
and the one-pass forced scorers agree case by case, on a hand-set model that gets some right."""

import jax
import numpy as np
import pytest

from molf_jax import models
from molf_jax.data import (
    OPTION_TEXT,
    ProbeFact,
    byte_level_tokenizer,
    load_task,
    med_example,
    render_example,
)
from molf_jax.eval import (
    answered,
    evaluate_task,
    generate_texts,
    jax_generate_fn,
    med_metrics,
    med_text_correct_forced,
    med_text_metrics,
    retained_facts,
    text_correct,
)

TOK = byte_level_tokenizer()
COLUMNS = ("opa", "opb", "opc", "opd")


def _id(char: str) -> int:
    (token,) = TOK(char, add_special_tokens=False)["input_ids"]
    return token


def bigram_model(stop: int, seed: int = 0):
    """A Qwen2 model whose next token depends on the current token only: attention and MLP
    write nothing, so the output head sees the current token's normed embedding. The head is
    set so that ':' and '=' are followed by ' ', ' ' by '4', '4' by '2' and '2' by ``stop``:
    greedy decoding after any prompt ending in ':' or '=' writes ' 42' then ``stop``."""
    config = models.Qwen2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                tie_word_embeddings=False)
    model = models.build_model(config)
    params = jax.tree.map(np.array, models.init_params(model, jax.random.key(seed)))
    layer = params["layers"]["0"]
    layer["self_attn"]["o_proj"]["kernel"][:] = 0.0
    layer["mlp"]["down_proj"]["kernel"][:] = 0.0
    table = {_id(":"): _id(" "), _id("="): _id(" "), _id(" "): _id("4"), _id("4"): _id("2"),
             _id("2"): stop}
    tokens = np.array(sorted(table), np.int32)[:, None]
    hidden = np.asarray(model.apply({"params": params}, tokens, np.ones_like(tokens),
                                    return_hidden=True))[:, 0]
    head = np.random.default_rng(seed).normal(size=params["lm_head"]["kernel"].shape) * 0.1
    for h, token in zip(hidden, sorted(table)):
        head[:, table[token]] += 10.0 * h / np.linalg.norm(h)
    params["lm_head"]["kernel"] = head.astype(np.float32)
    return model, params


STOPS = {"eos": TOK.eos_token_id, "newline": _id("\n")}


def _with_options(record, options, cop):
    return {**record, **dict(zip(COLUMNS, options)), "cop": cop}


def _cases():
    """Offline Med records with options set so that the model's ' 42' is right for some."""
    base = load_task("med", "offline", size=4, seed=0).eval[:7]
    return [
        _with_options(base[0], ["7", "42", "9", "11"], 1),      # right
        _with_options(base[1], ["4", "42", "9", "11"], 0),      # a prefix: the model goes on
        _with_options(base[2], ["421", "42", "9", "11"], 0),    # longer: the model stops
        _with_options(base[3], ["43", "8", "9", "11"], 0),      # another answer
        _with_options(base[4], ["5", "6", " 42 ", "11"], 2),    # right (options are stripped)
        _with_options(base[5], ["42", "6", "7", "8"], 3),       # an option, not the right one
        _with_options(base[6], ["3", "5", "6", "42"], 3),       # right
    ]


EXPECTED = [True, False, False, False, True, False, True]


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_forced_med_scores_agree_with_generating_and_the_text_metric(stop):
    model, params = bigram_model(STOPS[stop])
    records = _cases()
    # Two batches (the second one filled), one length bucket: one compilation of each program.
    texts = generate_texts([render_example("med", r).prompt for r in records], TOK,
                           jax_generate_fn(model, params, TOK, max_new_tokens=8), batch_size=4,
                           pad_to_multiple_of=256)
    assert {t.split("\n")[0] for t in texts} == {" 42"}  # the hand-set model answers " 42"
    by_text = [text_correct(t, r) for t, r in zip(texts, records)]
    forced = med_text_correct_forced(model, params, TOK, records, batch_size=4,
                                     pad_to_multiple_of=256)
    assert forced == by_text == EXPECTED
    metrics = evaluate_task("med", model, params, TOK, records, batch_size=4, max_new_tokens=8,
                            pad_to_multiple_of=256)
    assert metrics == {"accuracy": {"value": 3 / 7, "n": 7},
                       "valid_option": {"value": 6 / 7, "n": 7}}  # all but "43"


def test_the_text_metric_cuts_at_the_first_newline_and_is_case_sensitive():
    record = {"opa": "Lima", "opb": "Quito", "opc": "Buenos Aires", "opd": "Rome", "cop": 2,
              "answer_style": OPTION_TEXT}
    generations = [" Buenos Aires\nQuestion: next", "Buenos Aires ", " buenos aires",
                   " Buenos", " Lima", " Buenos Aires.", " B"]
    correct = [text_correct(g, record) for g in generations]
    assert correct == [True, True, False, False, False, False, False]
    metrics = med_metrics(generations, [record] * len(generations))
    assert metrics == med_text_metrics(generations, [record] * len(generations))
    assert metrics["accuracy"] == {"value": 2 / 7, "n": 7}
    assert metrics["valid_option"] == {"value": 3 / 7, "n": 7}  # two right and ' Lima'
    with pytest.raises(ValueError, match="1 of 2 Med records answer with the option's text"):
        med_metrics([" A", " A"], [record, {**record, "answer_style": None}])


def test_offline_med_trains_on_the_option_text_then_eos():
    record = load_task("med", "offline", size=4, seed=0).train[0]
    assert record["answer_style"] == OPTION_TEXT
    example = med_example(record)
    assert example.target == " " + record[COLUMNS[record["cop"]]].strip()
    assert example.add_eos
    assert example.prompt.endswith("Answer with the option's text.\nAnswer:")
    lettered = {k: v for k, v in record.items() if k != "answer_style"}  # MedMCQA's form
    assert med_example(lettered).target == " " + "ABCD"[record["cop"]]
    assert "option's text" not in med_example(lettered).prompt
    with pytest.raises(ValueError, match="no authors' protocol"):
        render_example("med", record, protocol="authors")
    with pytest.raises(ValueError, match="no authors' protocol"):
        evaluate_task("med", None, None, TOK, [record], protocol="authors",
                      generate_fn=lambda ids, mask: ids[:, :1])
    with pytest.raises(ValueError, match="answer with a letter"):
        med_text_correct_forced(None, None, TOK, [lettered], batch_size=1)


@pytest.mark.parametrize("stop", sorted(STOPS))
def test_retained_facts_follow_greedy_decoding_of_the_cloze(stop):
    model, params = bigram_model(STOPS[stop])
    probe = [
        ProbeFact("20 + 22 =", " 42", "42", "arithmetic +"),  # retained
        ProbeFact("Answer:", " 42", "42", "made up"),         # retained
        ProbeFact("2 + 2 =", " 4", "4", "arithmetic +"),      # the model writes 42, not 4
        ProbeFact("40 + 3 =", " 43", "43", "arithmetic +"),
        ProbeFact("400 + 21 =", " 421", "421", "arithmetic +"),
    ]
    kept = retained_facts(model, params, TOK, probe, batch_size=2)
    assert kept == [1, 1, 0, 0, 0]
    texts = generate_texts([f.cloze for f in probe], TOK,
                           jax_generate_fn(model, params, TOK, max_new_tokens=5), batch_size=2)
    assert kept == [int(answered(t, f.answer)) for t, f in zip(texts, probe)]
