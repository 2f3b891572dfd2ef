"""Evaluation of the three tasks: SQL exact match / execution accuracy, Med accuracy, Fact scores.

``evaluate_task`` renders prompts from hub-format records, runs batched greedy generation (SQL,
Med) or one forward pass for next-token logits (Fact), and returns
``{metric: {'value': v, 'n': samples}}``; ``append_result_row`` logs rows to CSV/JSONL; the
``eval`` CLI subcommand lives in `molf_jax.cli.eval`.
"""

# Running a task.
from molf_jax.eval._runner import (
    DEFAULT_MAX_NEW_TOKENS,
    decode_generation,
    evaluate_task,
    generate_texts,
    jax_generate_fn,
    jax_next_token_logits_fn,
    left_pad,
    prompt_batches,
)
from molf_jax.eval._teacher_forced import teacher_forced_argmax
from molf_jax.eval._forced_scores import (
    answered,
    known_by_forcing,
    med_text_correct_forced,
    retained_facts,
)
from molf_jax.data import pad_token_id

# Metrics.
from molf_jax.eval._sql_metrics import (
    SqlExecutionError,
    execute_sql,
    extract_sql,
    normalize_sql,
    results_match,
    sql_exact_match,
    sql_metrics,
)
from molf_jax.eval._med_metrics import (
    first_option_letter,
    med_metrics,
    med_text_metrics,
    text_answer,
    text_correct,
)
from molf_jax.eval._fact_metrics import (
    FactQuery,
    distinguishing_tokens,
    fact_queries,
    fact_scores,
    target_tokens,
)

# The authors' scoring (protocol 'authors'), kept as their code does it.
from molf_jax.eval._authors_sql import (
    authors_execute,
    authors_exact_match,
    authors_extract_sql,
    authors_results_match,
    authors_sql_metrics,
)
from molf_jax.eval._authors_mcq import authors_med_metrics, authors_option_letter
from molf_jax.eval._authors_fact import (
    authors_fact_queries,
    authors_fact_scores,
    authors_probabilities,
)
from molf_jax.eval._reported import REPORTED_METRICS, paper_comparison

# Result files.
from molf_jax.eval._results import RESULT_FIELDS, append_result_row, report_metrics

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "FactQuery",
    "REPORTED_METRICS",
    "RESULT_FIELDS",
    "SqlExecutionError",
    "answered",
    "append_result_row",
    "authors_exact_match",
    "authors_execute",
    "authors_extract_sql",
    "authors_fact_queries",
    "authors_fact_scores",
    "authors_med_metrics",
    "authors_option_letter",
    "authors_probabilities",
    "authors_results_match",
    "authors_sql_metrics",
    "decode_generation",
    "distinguishing_tokens",
    "evaluate_task",
    "execute_sql",
    "extract_sql",
    "fact_queries",
    "fact_scores",
    "first_option_letter",
    "generate_texts",
    "jax_generate_fn",
    "jax_next_token_logits_fn",
    "known_by_forcing",
    "left_pad",
    "med_metrics",
    "med_text_correct_forced",
    "med_text_metrics",
    "normalize_sql",
    "paper_comparison",
    "pad_token_id",
    "prompt_batches",
    "results_match",
    "retained_facts",
    "sql_exact_match",
    "sql_metrics",
    "target_tokens",
    "teacher_forced_argmax",
    "text_answer",
    "text_correct",
]
