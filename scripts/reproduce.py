"""Does MoLF pay off? Every method tuned the same way on the real Gemma 3 270M, three seeds,
paired intervals, forgetting, and the routing study; the harness is `molf_jax.experiments`.

  python scripts/reproduce.py                    # the whole plan (one 80 GB GPU)
  python scripts/reproduce.py --render           # the tables from OUT/results.json
  python scripts/reproduce.py --collect          # results.json again from OUT/rows
  python scripts/reproduce.py --render --update-docs   # the tables into the README and docs

Outputs in ``--out-dir`` (default ``reproduce_results``): ``rows/*.json`` (one per method,
setting and seed, with per-case test scores; a rerun skips programs whose rows exist),
``timings.json`` (rewritten after each program), ``results.json`` and ``plots/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from molf_jax.device_memory import use_device_memory
from molf_jax.experiments.plan import GRIDS, PRESETS, TASKS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help="'default' (the embedded Gemma 3 270M) or an HF folder")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-study", dest="study", action="store_false")
    p.add_argument("--preset", default="gpu", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)  # smoke runs
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"),
                   help="activations while training (default: bfloat16 on GPUs, else float32)")
    p.add_argument("--no-retention", dest="retention", action="store_false",
                   help="skip the forgetting probe")
    p.add_argument("--compile-ahead", type=int, default=4,
                   help="programs compiled in threads while another trains")
    p.add_argument("--compile-nice", type=int, default=None,
                   help="raise the compile threads' and worker processes' nice value by this "
                        "much (Linux); default 10 on GPUs, else 0")
    p.add_argument("--compile-processes", type=int, default=None,
                   help="compile each program in one of this many worker processes and load "
                        "its executables in the process that trains, which then lowers and "
                        "compiles nothing (its compile threads only wait and load); 0: the "
                        "threads compile. Default 2 on GPUs, else 0")
    p.add_argument("--out-dir", default="reproduce_results")
    p.add_argument("--render", action="store_true", help="only print the tables")
    p.add_argument("--collect", action="store_true",
                   help="only rebuild results.json and plots from the rows on disk")
    p.add_argument("--update-docs", action="store_true",
                   help="with --render: write the tables into docs/reproduction.md and the "
                        "summary into README.md (between their markers)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.render:
        from molf_jax.experiments import SUMMARY_BEGIN, SUMMARY_END, render, render_summary, splice

        results = json.loads((out_dir / "results.json").read_text())
        print(render(results))
        if args.update_docs:
            root = Path(__file__).resolve().parents[1]
            for page, text, markers in (
                    (root / "docs" / "reproduction.md", render(results), None),
                    (root / "README.md", render_summary(results), (SUMMARY_BEGIN, SUMMARY_END))):
                page.write_text(splice(page.read_text(), text, *([markers] if markers else [])))
                print(f"updated {page}", file=sys.stderr)
        return

    from molf_jax.experiments.runner import collect

    command = shlex.join(["python", "scripts/reproduce.py", *(argv or sys.argv[1:])])
    wall, failed, timings = None, [], {}
    if not args.collect:
        # The sweep's programs size themselves to the card: JAX must be let take it, less
        # where worker processes compile (their contexts and autotuning need some: at 0.85
        # four workers' autotuning ran out of memory on an 80 GB card, docs/reproduction.md).
        print(use_device_memory("0.95" if args.compile_processes == 0 else "0.7"),
              file=sys.stderr)
        import jax

        from molf_jax.experiments.plan import Plan
        from molf_jax.experiments.runner import Runner

        gpu = jax.default_backend() == "gpu"
        # On a GPU the threads' tracing would hold the GIL that feeds it: compile elsewhere.
        processes = args.compile_processes if args.compile_processes is not None else (
            2 if gpu else 0)
        nice = args.compile_nice if args.compile_nice is not None else (10 if gpu else 0)
        # On a GPU: bf16 activations; each layer is recomputed in the backward pass only
        # where the members would not fit one program otherwise.
        runner = Runner(args.model, out_dir,
                        compute_dtype=args.compute_dtype or ("bfloat16" if gpu else "float32"),
                        remat=("none", "full") if gpu else "none", retention=args.retention,
                        compile_ahead=args.compile_ahead, compile_nice=nice,
                        compile_processes=processes)
        plan = Plan(tuple(args.tasks), tuple(args.methods), tuple(args.seeds),
                    preset=args.preset, study=args.study)
        runner.run(plan, steps=args.steps)
        wall, failed, timings = runner.plan_wall_seconds, runner.failed, runner.timings
    elif (out_dir / "results.json").is_file():
        old = json.loads((out_dir / "results.json").read_text())
        command, wall = old.get("command", command), old.get("plan_wall_seconds")
        failed, timings = old.get("failed_runs", []), old.get("timings", {})
    elif (out_dir / "timings.json").is_file():  # a run stopped before its results.json
        timings = json.loads((out_dir / "timings.json").read_text())
    results, rows = collect(out_dir, args.seeds, command=command, plan_wall_seconds=wall,
                            failed_runs=failed, timings=timings, preset=args.preset)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    from molf_jax.experiments import plot_study, render

    plot_study(results, rows, out_dir)
    print(render(results))
    print(f"\nresults: {out_dir / 'results.json'}; plots: {out_dir / 'plots'}")
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
