"""A record of any task, rendered by either protocol: training example or evaluation prompt."""

from __future__ import annotations

from typing import Any, Mapping

from molf_jax.data._authors_prompts import (
    authors_fact_example,
    authors_med_eval_prompt,
    authors_med_example,
    authors_sql_example,
)
from molf_jax.data._prompts import (
    TASKS,
    Example,
    answers_with_text,
    fact_example,
    med_example,
    sql_example,
)
from molf_jax.data._protocol import AUTHORS, MOLF_JAX, PROTOCOLS


def _check(task: str, protocol: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def render_example(
    task: str,
    record: Mapping[str, Any],
    *,
    sql_with_context: bool = True,
    protocol: str = MOLF_JAX,
) -> Example:
    """Renders a record of ``task`` ('sql', 'med' or 'fact') into training prompt and target.

    Example:
      >>> rec = {'question': 'Q?', 'opa': 'w', 'opb': 'x', 'opc': 'y', 'opd': 'z', 'cop': 3}
      >>> render_example('med', rec).target, render_example('med', rec, protocol='authors').add_eos
      (' D', True)
    """
    _check(task, protocol)
    if protocol == AUTHORS:
        if task == "med" and answers_with_text(record):
            raise ValueError("Med records answered with the option's text (the offline task) "
                             "have no authors' protocol (theirs answers with a letter); use "
                             "protocol='molf_jax'")
        if task == "sql":
            return authors_sql_example(record, with_context=sql_with_context)
        return authors_med_example(record) if task == "med" else authors_fact_example(record)
    if task == "sql":
        return sql_example(record, with_context=sql_with_context)
    return med_example(record) if task == "med" else fact_example(record)


def eval_prompt(
    task: str,
    record: Mapping[str, Any],
    *,
    sql_with_context: bool = True,
    protocol: str = MOLF_JAX,
) -> str:
    """The prompt a model is evaluated on; differs from training only for 'med' under 'authors'.

    Example:
      >>> rec = {'question': 'Q?', 'opa': 'w', 'opb': 'x', 'opc': 'y', 'opd': 'z', 'cop': 0}
      >>> eval_prompt('med', rec, protocol='authors')[:7]
      '\\nAnswer'
    """
    _check(task, protocol)
    if protocol == AUTHORS and task == "med":
        return authors_med_eval_prompt(record)
    return render_example(task, record, sql_with_context=sql_with_context,
                          protocol=protocol).prompt
