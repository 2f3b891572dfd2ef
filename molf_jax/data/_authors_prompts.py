"""The authors' prompt and target text for SQL, Med and Fact, restated from their code.

Source: 11785T23/molf at 24f2c9f, ``src/data/prompts.py`` and the three dataset builders
(``sql.py``, ``medmcqa.py``, ``fact.py``) plus the evaluators' prompt builders. Every target ends
with EOS (their ``target + tokenizer.eos_token``), and the Med evaluation prompt starts with a
newline the training prompt lacks (their zero-shot ``demo_section + "\\n" + template``).
"""

from __future__ import annotations

from typing import Any, Mapping

from molf_jax.data._prompts import OPTION_COLUMNS, OPTION_LETTERS, Example, fill_subject

AUTHORS_SQL_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWrite a SQL query to answer the question.\n\n"
    "### Input:\n{sql_prompt}\n\n### Context:\n{sql_context}\n\n### Response:\n"
)
# Used when a record's sql_context is blank.
AUTHORS_SQL_NO_CONTEXT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\nWrite a SQL query to answer the question.\n\n"
    "### Input:\n{sql_prompt}\n\n### Response:\n"
)
AUTHORS_MED_TEMPLATE = (
    "Answer the medical question below by choosing the correct option letter.\n"
    "Question: {question}\nOptions:\nA) {opa}\nB) {opb}\nC) {opc}\nD) {opd}\nAnswer:"
)


def _text(record: Mapping[str, Any], column: str) -> str:
    value = record.get(column)
    return "" if value is None else str(value).strip()


def authors_sql_example(record: Mapping[str, Any], *, with_context: bool = True) -> Example:
    """A gretelai record as the authors render it: fixed instruction, question, schema, SQL + EOS.

    Example:
      >>> ex = authors_sql_example({'sql_prompt': 'Count rows.', 'sql_context': '',
      ...                           'sql': 'SELECT COUNT(*) FROM t;'})
      >>> '### Context:' in ex.prompt, ex.target, ex.add_eos   # blank schema: no Context block
      (False, 'SELECT COUNT(*) FROM t;', True)
    """
    context = _text(record, "sql_context") if with_context else ""
    question = _text(record, "sql_prompt")
    if context:
        prompt = AUTHORS_SQL_TEMPLATE.format(sql_prompt=question, sql_context=context)
    else:
        prompt = AUTHORS_SQL_NO_CONTEXT_TEMPLATE.format(sql_prompt=question)
    return Example(prompt=prompt, target=_text(record, "sql"), add_eos=True)


def authors_med_prompt(record: Mapping[str, Any]) -> str:
    """The authors' MedMCQA training prompt (fields stripped), ending in ``"Answer:"``."""
    fields = {column: _text(record, column) for column in OPTION_COLUMNS}
    return AUTHORS_MED_TEMPLATE.format(question=_text(record, "question"), **fields)


def authors_med_example(record: Mapping[str, Any]) -> Example:
    """A MedMCQA record as the authors train on it: target ``" " + letter`` then EOS.

    A ``cop`` outside 0..3 becomes ``'A'``, as their ``options_map.get(cop, 'A')`` does.

    Example:
      >>> authors_med_example({'question': 'Q?', 'opa': 'w', 'opb': 'x', 'opc': 'y', 'opd': 'z',
      ...                      'cop': 1}).target
      ' B'
    """
    cop = record.get("cop")
    letter = OPTION_LETTERS[cop] if cop in (0, 1, 2, 3) else "A"
    return Example(prompt=authors_med_prompt(record), target=" " + letter, add_eos=True)


def authors_med_eval_prompt(record: Mapping[str, Any]) -> str:
    """The authors' MedMCQA evaluation prompt: a newline, then the training prompt.

    Their evaluator joins few-shot demonstrations and the question with ``"\\n"``; with zero
    shots the newline is left at the start, so the model is asked in a form it never trained on.
    """
    return "\n" + authors_med_prompt(record)


def authors_fact_prompt(template: str, subject: str) -> str:
    """A CounterFact prompt with the stripped subject filled in, stripped (their ``fact.py``)."""
    return fill_subject(template, subject.strip()).strip()


def authors_fact_example(record: Mapping[str, Any]) -> Example:
    """A CounterFact rewrite as the authors train on it: target ``" " + target_new`` then EOS.

    Example:
      >>> rec = {'requested_rewrite': {'prompt': 'The mother tongue of {} is ', 'subject': 'Ann',
      ...        'target_new': {'str': 'English'}, 'target_true': {'str': 'French'}}}
      >>> authors_fact_example(rec)
      Example(prompt='The mother tongue of Ann is', target=' English', add_eos=True)
    """
    rewrite = record["requested_rewrite"]
    return Example(
        prompt=authors_fact_prompt(rewrite["prompt"], rewrite["subject"]),
        target=" " + str(rewrite["target_new"]["str"]).strip(),
        add_eos=True,
    )
