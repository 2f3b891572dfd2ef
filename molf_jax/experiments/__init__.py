"""The reproduction harness as a library: plan, sweep, scoring, statistics and rendering.

``scripts/reproduce.py`` is its entry point; tests import this package.
"""

# Statistics: tuning on validation, paired bootstrap, claims (pure functions over rows).
from molf_jax.experiments.stats import (
    BOOTSTRAP_SAMPLES,
    CI_PERCENTILES,
    CLAIM_MARGIN,
    CLAIMS,
    COMPARISONS,
    PRIMARY,
    STUDY_VARIANTS,
    TASK_ORDER,
    choose_settings,
    incomplete_sweeps,
    metric_of,
    metric_with_retention,
    paired_bootstrap,
    paired_difference,
    percentile_interval,
    retention_of,
    study_table,
    summarise,
    verdict,
)

# Rendering: the tables from results.json, kept in step with a docs page; the study's plots.
from molf_jax.experiments.render import BEGIN, END, in_step, plot_study, render, splice

__all__ = [
    "BEGIN",
    "BOOTSTRAP_SAMPLES",
    "CI_PERCENTILES",
    "CLAIMS",
    "CLAIM_MARGIN",
    "COMPARISONS",
    "END",
    "PRIMARY",
    "STUDY_VARIANTS",
    "TASK_ORDER",
    "choose_settings",
    "in_step",
    "incomplete_sweeps",
    "metric_of",
    "metric_with_retention",
    "paired_bootstrap",
    "paired_difference",
    "percentile_interval",
    "plot_study",
    "render",
    "retention_of",
    "splice",
    "study_table",
    "summarise",
    "verdict",
]
