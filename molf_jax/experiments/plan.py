"""What the reproduction runs: tasks and their sizes, every method's rate grid, the routing study,
and how they group into vmapped programs.

Every method is tuned the same way: each setting of its grid runs on the first seed, and the
setting with the best validation metric there is the one reported on all seeds
(`molf_jax.experiments.stats.choose_settings`). Grids (issue 24, the authors' sweeps where they
have one): fft {1e-4, 5e-5, 2e-5}; lora r32 {5e-4, 5e-5}; molf and molf_gate at equal FFT and
LoRA rates {1e-4, 5e-5, 2e-5}; molfe (top-2 and top-1) and adalora {5e-4, 1e-4, 5e-5}.
``molf_recipe`` is MoLF at the authors' quickstart rate (5e-5, equal rates), reported as its own
row.

A program (one mode configuration) trains several members at once
(`molf_jax.experiments.train_members`) in two phases with one compilation: first every setting
on the first seed, then, once their validation has chosen, only the chosen settings on the later
seeds (`phases`, `program_width`). The results are exactly those of running each setting alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from molf_jax.experiments.sweep import Member

__all__ = ["TaskSize", "PRESETS", "GRIDS", "STUDY", "CUSTOM_SCORE", "Program", "Plan",
           "programs", "phases", "program_width", "setting_label", "grid_labels"]

TASKS = ("med", "fact", "sql")
CUSTOM_SCORE = "molf_jax.experiments.scores:epd_without_lr"


def _equal(rates):
    return [{"fft_lr": r, "lora_lr": r} for r in rates]


# Method -> (mode settings shared by its grid, the grid of rates). Rates are per member.
GRIDS: dict[str, tuple[dict[str, Any], list[dict[str, float]]]] = {
    "fft": ({"mode": "fft"}, [{"fft_lr": r} for r in (1e-4, 5e-5, 2e-5)]),
    "lora": ({"mode": "lora"}, [{"lora_lr": r} for r in (5e-4, 5e-5)]),
    "molf": ({"mode": "molf"}, _equal((1e-4, 5e-5, 2e-5))),
    "molf_recipe": ({"mode": "molf"}, _equal((5e-5,))),
    "molf_gate": ({"mode": "molf_gate"}, _equal((1e-4, 5e-5, 2e-5))),
    "molfe": ({"mode": "molfe"}, _equal((5e-4, 1e-4, 5e-5))),
    "molfe_top1": ({"mode": "molfe", "top_k": 1}, _equal((5e-4, 1e-4, 5e-5))),
    "adalora": ({"mode": "adalora"}, [{"lora_lr": r} for r in (5e-4, 1e-4, 5e-5)]),
}
# The routing study, first seed only: molf at the recipe's FFT rate with another LoRA/FFT
# rate ratio, another score, or a score of your own.
STUDY: dict[str, tuple[dict[str, Any], dict[str, float]]] = {
    "molf_ratio3": ({"mode": "molf"}, {"fft_lr": 5e-5, "lora_lr": 1.5e-4}),
    "molf_ratio10": ({"mode": "molf"}, {"fft_lr": 5e-5, "lora_lr": 5e-4}),
    "molf_pfn": ({"mode": "molf", "score": "pfn"}, {"fft_lr": 5e-5, "lora_lr": 5e-5}),
    "molf_score": ({"mode": "molf", "score": CUSTOM_SCORE}, {"fft_lr": 5e-5, "lora_lr": 5e-5}),
}


@dataclasses.dataclass(frozen=True)
class TaskSize:
    """How much of a task one run sees and how it trains.

    Attributes:
      task_size: records the offline generator makes for training.
      val: validation cases (the first evaluation records), used to choose rates.
      test: test cases after them (None: every remaining evaluation record).
      max_length: longest training example in tokens.
      epochs: passes over the training examples.
      eval_size: offline sql: held-out examples generated.
      offline_options: options of the offline generator (`molf_jax.data.load_task`'s
        ``offline_options``) as ``(name, value)`` pairs, e.g. sql's held-out query kinds.
      score_batch: rows per scoring pass; validation and test are scored together, so one
        pass (or a few for fact's many short queries) scores a member.
      remat: the runner's rematerialisation candidates this task keeps (None: all), for a task
        whose steps are known not to fit without it: each candidate tried is a compilation.
      compiler_options: XLA options of the task's training steps, as ``(name, value)`` pairs
        (`molf_jax.experiments.sweep.MemberProgram.compile`).
    """

    task_size: int
    val: int
    test: int | None
    max_length: int = 256
    epochs: float = 2.0
    eval_size: int | None = None
    offline_options: tuple[tuple[str, Any], ...] = ()
    score_batch: int = 256
    remat: tuple[str, ...] | None = None
    compiler_options: tuple[tuple[str, Any], ...] = ()


# Short steps compile with cuBLAS for every matmul (no Triton GEMM fusions, whose autotuning
# runs on the GPU beside the training): on one H100 the 5-member molf step of fact compiled in
# 11.4 s instead of 21.4 s and ran in 88 instead of 92 ms; sql's (448 tokens) in 18.8 instead of
# 32.1 s but ran in 539 instead of 485 ms, so sql keeps XLA's default (`python
# scripts/bench_sweep.py --tasks fact sql --modes molf --members molf=5 --threads 0`, with and
# without XLA_FLAGS=--xla_gpu_enable_triton_gemm=false).
CUBLAS_GEMMS = (("xla_gpu_enable_triton_gemm", False),)


# SQL query kinds training never sees (`molf_jax.data.SQL_KINDS`): the test keeps the natural
# mix, so about a quarter of its cases ask for a query shape never trained (106 of 400 on seed
# 0). With every kind trained, 640 examples saturated FFT at 96.
SQL_HELD_OUT = ("having", "join_having", "join_not_in", "above_average", "join_top", "join_in")

PRESETS: dict[str, dict[str, TaskSize]] = {
    # One 80 GB GPU (H100 or H200).
    # Scoring: med's 568 cases and sql's 464 in one pass each, fact's 12,288 queries of at
    # most 16 tokens in three.
    "gpu": {"med": TaskSize(320, 64, None, score_batch=576, compiler_options=CUBLAS_GEMMS),
            "fact": TaskSize(1536, 256, 1280, epochs=3.0, score_batch=4096,
                             compiler_options=CUBLAS_GEMMS),
            # Without rematerialisation one sql member's step needs 37 GiB of temporaries (XLA's
            # memory analysis of the CPU compile, fft, 448 tokens; 6 GiB with it): in the 908 s
            # sitting six of sql's programs compiled both ways on the GPU and none fitted 3
            # members without it.
            "sql": TaskSize(640, 64, 400, 512, eval_size=464,
                            offline_options=(("held_out_kinds", SQL_HELD_OUT),),
                            score_batch=512, remat=("full",))},
    # Designs tried for a regime where LoRA might win (issue 24), run beside the plan:
    # few examples, many passes (FFT may overfit where LoRA learns less).
    "design_sql_few": {"sql": TaskSize(96, 64, 400, 512, epochs=6.0, eval_size=464,
                                       score_batch=512, remat=("full",))},
    # Tiny sizes for the test suite (with a tiny model).
    "smoke": {"med": TaskSize(8, 4, 4, 512),
              "fact": TaskSize(8, 4, 4, 512),
              "sql": TaskSize(24, 4, 4, 2048, eval_size=8)},
}


def setting_label(setting: dict[str, Any]) -> str:
    """``{'fft_lr': 5e-05}`` -> ``'fft_lr=5e-05'``; empty -> ``'recipe'``.

    Example:
      >>> setting_label({"lora_lr": 5e-4, "fft_lr": 5e-5})
      'fft_lr=5e-05,lora_lr=0.0005'
    """
    parts = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
             for k, v in sorted(setting.items()) if k != "mode"]
    return ",".join(parts).replace(":", "-") or "recipe"


def grid_labels() -> dict[str, list[str]]:
    """Method -> its settings' labels in grid order (ties in tuning go to the first)."""
    return {m: [setting_label(s) for s in grid] for m, (_, grid) in GRIDS.items()}


@dataclasses.dataclass(frozen=True)
class Program:
    """One vmapped program: a mode configuration and the members it trains.

    Attributes:
      task: the task.
      name: a file-safe name (``fact__molf``).
      settings: TrainConfig overrides shared by the members (mode, top_k, score).
      members: the runs (seed, fft rate, lora rate).
      methods: per member, the (method, setting label) rows it reports.
    """

    task: str
    name: str
    settings: dict[str, Any]
    members: tuple[Member, ...]
    methods: tuple[tuple[tuple[str, str], ...], ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A reproduction: tasks, methods, seeds, study, sizes and model."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    preset: str = "gpu"
    study: bool = True


def _member(seed: int, rates: dict[str, float]) -> Member:
    # A rate a mode never uses is still fixed, so that members stay comparable by label.
    return Member(seed, rates.get("fft_lr", 5e-5), rates.get("lora_lr", 5e-5))


def programs(plan: Plan, task: str) -> list[Program]:
    """The task's programs: one per mode configuration, with every member it needs.

    Example:
      >>> [p.name for p in programs(Plan(("fact",), ("fft", "lora"), (0, 1)), "fact")]
      ['fact__fft', 'fact__lora', 'fact__molf', 'fact__molf__pfn', 'fact__molf__score']
      >>> len(programs(Plan(("fact",), ("fft",), (0, 1), study=False), "fact")[0].members)
      6
    """
    wanted: list[tuple[str, dict[str, Any], dict[str, float], int]] = []
    for method in plan.methods:
        shared, grid = GRIDS[method]
        wanted += [(method, shared, rates, seed) for rates in grid for seed in plan.seeds]
    if plan.study:
        wanted += [(name, shared, rates, plan.seeds[0]) for name, (shared, rates) in
                   STUDY.items()]
    grouped: dict[str, tuple[dict[str, Any], dict[Member, list[tuple[str, str]]]]] = {}
    for method, shared, rates, seed in wanted:
        key = setting_label({**shared, "m": shared["mode"]})
        _, members = grouped.setdefault(key, (shared, {}))
        members.setdefault(_member(seed, rates), []).append((method, setting_label(rates)))
    out = []
    for shared, members in grouped.values():
        name = "__".join([task, shared["mode"]] + [f"{k}{v}" for k, v in sorted(shared.items())
                                                    if k != "mode" and k != "score"])
        if "score" in shared:
            name += "__" + ("pfn" if shared["score"] == "pfn" else "score")
        # First-seed members first: their validation chooses what later seeds score.
        ordered = sorted(members, key=lambda m: m.seed != plan.seeds[0])
        out.append(Program(task=task, name=name.replace(".", "-"), settings=dict(shared),
                           members=tuple(ordered),
                           methods=tuple(tuple(members[m]) for m in ordered)))
    return out


def phases(program: Program, first_seed: int) -> tuple[list[Member], list[Member]]:
    """The program's first-seed members (every setting: validation chooses among them) and its
    later-seed members (of which only the chosen settings' are trained)."""
    first = [m for m in program.members if m.seed == first_seed]
    return first, [m for m in program.members if m.seed != first_seed]


def program_width(program: Program, first_seed: int) -> int:
    """Members one compiled program trains at once: enough for either phase, the first seed's
    members or the most later-seed members validation can choose (one per tuned method and
    later seed); a phase with fewer is padded with repeats.

    Example:
      >>> plan = Plan(("med",), ("fft", "molf", "molf_recipe"), (0, 1, 2))
      >>> {p.name: program_width(p, 0) for p in programs(plan, "med")}["med__molf"]
      5
    """
    first, later = phases(program, first_seed)
    tuned = {method for methods in program.methods for method, _ in methods if method in GRIDS}
    choosable = len(tuned) * len({m.seed for m in later})
    return max(len(first), min(len(later), choosable))
