"""The reproduction harness as a library: plan, sweep, scoring, statistics and rendering.

``scripts/reproduce.py`` is its entry point; tests import this package.
"""

# Training many runs of one mode as one program (seeds and rates vmapped).
from molf_jax.experiments.sweep import Member, SweepResult, member_params, train_members

# The plan: grids, tasks and their sizes, programs.
from molf_jax.experiments.plan import (GRIDS, PRESETS, STUDY, Plan, Program, TaskSize,
                                       grid_labels, programs, setting_label)

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
from molf_jax.experiments.render import (BEGIN, END, SUMMARY_BEGIN, SUMMARY_END, in_step,
                                         plot_study, render, render_summary, splice)

__all__ = [
    "GRIDS",
    "Member",
    "PRESETS",
    "Plan",
    "Program",
    "STUDY",
    "SweepResult",
    "TaskSize",
    "grid_labels",
    "member_params",
    "programs",
    "setting_label",
    "train_members",
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
    "render_summary",
    "SUMMARY_BEGIN",
    "SUMMARY_END",
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
