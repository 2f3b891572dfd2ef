"""Prompt and target text of the three paper tasks, rendered from records in the hub formats.

One function per task turns a record into a :class:`Example` (prompt text, target text, and
whether the tokenized target ends with EOS). Training sees ``prompt + target``, evaluation feeds
``prompt`` alone, so both stay aligned by construction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

TASKS = ("sql", "med", "fact")
OPTION_LETTERS = ("A", "B", "C", "D")
OPTION_COLUMNS = ("opa", "opb", "opc", "opd")
# A Med record with ``answer_style: OPTION_TEXT`` (the offline task's) is answered with the
# correct option's text; MedMCQA records (no such field) are answered with its letter.
ANSWER_STYLE = "answer_style"
OPTION_TEXT = "option_text"

# Alpaca's two templates (with and without an input block), worded as in the Stanford Alpaca
# release; the SQL task puts the question in the instruction and the schema in the input.
_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered training/evaluation example.

    Attributes:
      prompt: text the model conditions on (no loss on its tokens).
      target: text the model must produce (loss on its tokens).
      add_eos: whether the tokenized target is followed by the tokenizer's EOS token.
    """

    prompt: str
    target: str
    add_eos: bool


def sql_example(record: Mapping[str, Any], *, with_context: bool = True) -> Example:
    """Renders a gretelai/synthetic_text_to_sql record (``sql_prompt``, ``sql_context``, ``sql``).

    Example:
      >>> ex = sql_example({'sql_prompt': 'Count rows.', 'sql_context': 'CREATE TABLE t (a INT);',
      ...                   'sql': 'SELECT COUNT(*) FROM t;'})
      >>> ex.prompt.endswith('### Response:\\n'), ex.target, ex.add_eos
      (True, 'SELECT COUNT(*) FROM t;', True)
    """
    question = str(record["sql_prompt"]).strip()
    if with_context:
        prompt = _ALPACA_WITH_INPUT.format(
            instruction=question, input=str(record["sql_context"]).strip()
        )
    else:
        prompt = _ALPACA_NO_INPUT.format(instruction=question)
    return Example(prompt=prompt, target=str(record["sql"]).strip(), add_eos=True)


def answers_with_text(record: Mapping[str, Any]) -> bool:
    """Whether a Med record is answered with its option's text (offline) or letter (MedMCQA).

    Example:
      >>> answers_with_text({'answer_style': 'option_text'}), answers_with_text({'cop': 0})
      (True, False)
    """
    return record.get(ANSWER_STYLE) == OPTION_TEXT


def option_texts(record: Mapping[str, Any]) -> list[str]:
    """The four options of a Med record, stripped, in A-D order."""
    return [str(record[column]).strip() for column in OPTION_COLUMNS]


def correct_option(record: Mapping[str, Any]) -> str:
    """The correct option's text, stripped (``cop`` is 0-based).

    Example:
      >>> correct_option({'opa': 'w', 'opb': ' x ', 'opc': 'y', 'opd': 'z', 'cop': 1})
      'x'
    """
    return option_texts(record)[int(record["cop"])]


def med_prompt(record: Mapping[str, Any]) -> str:
    """The 4-option question text of a MedMCQA record, ending in ``"Answer:"``.

    A record answered with the option's text says so on the line before ``"Answer:"``.
    """
    lines = [f"Question: {str(record['question']).strip()}"]
    for letter, text in zip(OPTION_LETTERS, option_texts(record)):
        lines.append(f"{letter}. {text}")
    if answers_with_text(record):
        lines.append("Answer with the option's text.")
    lines.append("Answer:")
    return "\n".join(lines)


def med_example(record: Mapping[str, Any]) -> Example:
    """Renders a MedMCQA record; ``cop`` is the 0-based correct option (hub ClassLabel a..d).

    The target is the answer letter with a leading space (the prompt ends in ``"Answer:"``).
    A record with ``answer_style: 'option_text'`` (the offline task) is answered with the
    correct option's text instead, then EOS, so the model learns where the answer stops.

    Example:
      >>> rec = {'question': 'Q?', 'opa': 'w', 'opb': 'x', 'opc': 'y', 'opd': 'z', 'cop': 1}
      >>> ex = med_example(rec)
      >>> ex.prompt.splitlines()[-1], ex.target, ex.add_eos
      ('Answer:', ' B', False)
      >>> ex = med_example({**rec, 'answer_style': 'option_text'})
      >>> ex.prompt.splitlines()[-2:], ex.target, ex.add_eos
      (["Answer with the option's text.", 'Answer:'], ' x', True)
    """
    if answers_with_text(record):
        return Example(prompt=med_prompt(record), target=" " + correct_option(record),
                       add_eos=True)
    return Example(
        prompt=med_prompt(record), target=" " + OPTION_LETTERS[int(record["cop"])], add_eos=False
    )


def fill_subject(template: str, subject: str) -> str:
    """Fills CounterFact's ``{}`` placeholder with the subject (other braces are left alone)."""
    return template.replace("{}", subject)


def fact_example(record: Mapping[str, Any]) -> Example:
    """Renders the rewrite of a CounterFact record: the filled rewrite prompt and the new target.

    The target has a leading space, as in ROME's evaluation (``" " + target_new["str"]``).

    Example:
      >>> rec = {'requested_rewrite': {'prompt': 'The mother tongue of {} is', 'subject': 'Ann',
      ...        'target_new': {'str': 'English'}, 'target_true': {'str': 'French'}}}
      >>> fact_example(rec)
      Example(prompt='The mother tongue of Ann is', target=' English', add_eos=False)
    """
    rewrite = record["requested_rewrite"]
    return Example(
        prompt=fill_subject(rewrite["prompt"], rewrite["subject"]),
        target=" " + str(rewrite["target_new"]["str"]).strip(),
        add_eos=False,
    )
