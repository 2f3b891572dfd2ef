"""The metric each paper task reports, as the authors report it, with ours beside it."""

from __future__ import annotations

from typing import Any, Mapping

# task -> (the authors' reported metric, on their scale; ours on the same generations).
# Their README names SQL exact match (their code returns a 0-1 fraction), Med accuracy (x100)
# and the Fact efficacy score (x100).
REPORTED_METRICS = {
    "sql": ("authors_exact_match", ("exact_match", "execution_accuracy")),
    "med": ("authors_accuracy", ("accuracy",)),
    "fact": ("authors_efficacy_score", ("efficacy_score",)),
}


def paper_comparison(task: str, metrics: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One line: the paper's metric as they report it, then ours; None without their metrics.

    Example:
      >>> paper_comparison('med', {'authors_accuracy': {'value': 50.0, 'n': 4},
      ...                          'accuracy': {'value': 0.75, 'n': 4}})
      "paper's metric authors_accuracy 50.0000 (n 4) | ours: accuracy 0.7500 (n 4)"
    """
    paper, ours = REPORTED_METRICS[task]
    if paper not in metrics:
        return None
    beside = ", ".join(f"{name} {metrics[name]['value']:.4f} (n {metrics[name]['n']})"
                       for name in ours if name in metrics)
    return (f"paper's metric {paper} {metrics[paper]['value']:.4f} (n {metrics[paper]['n']}) | "
            f"ours: {beside}")
