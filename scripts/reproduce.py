"""A miniature reproduction of the MoLF paper's claim on the real Gemma 3 270M.

Five methods (fft; lora r32; molf = FFT + r128, EPD, top-1; molfe = r16 + r128; molf_gate = the
gradient-gated chain form) on the three offline tasks (sql, med, fact). Every run of a task sees
the same examples in the same order for the same number of steps (same token budget). Each
method's learning rates come from a sweep over ``--lr-scales`` times the library defaults (FFT
5e-5, LoRA 5e-4): the scale with the best *validation* metric is chosen and its *test* metric is
reported, so the reported split never picks a rate. Each run is its own process (its own peak
memory, nothing shared but the compilation cache); ``--workers`` run side by side, spread over
``--devices``.

  python scripts/reproduce.py --model PATH --workers 8 --devices 0,1,2,3   # the README's run
  python scripts/reproduce.py --render                  # the README tables from results.json

Outputs in ``--out-dir`` (default ``reproduce_results``): ``rows/*.json`` (one per run; a rerun
skips runs already there), ``runs/<task>/<method>_x<scale>/`` (metrics and routing logs),
``results.json`` (every run, the choice per method, the claim checks) and ``plots/`` (routing
plots of the chosen molf and molfe runs). Determinism: runs seed data order, initialisation
and dropout from ``--seed``, and on GPU XLA is told to use deterministic kernels, so rerunning
with the same seed gives the same metric values (``--check-repeat`` reruns one chosen run and
compares).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ("sql", "med", "fact")
METHODS = {
    "fft": {"mode": "fft"},
    "lora": {"mode": "lora", "lora_ranks": (32,)},
    "molf": {"mode": "molf", "lora_ranks": (128,)},
    "molfe": {"mode": "molfe", "lora_ranks": (16, 128)},
    "molf_gate": {"mode": "molf_gate", "lora_ranks": (128,)},
}
# The metric each task is judged by; fact uses ROME's score, the harmonic mean of the three.
PRIMARY = {"sql": "execution_accuracy", "med": "accuracy", "fact": "fact_score"}
FACT_PARTS = ("efficacy_score", "paraphrase_score", "neighborhood_score")
CLAIM_MARGIN = 0.015  # "within 1.5 points" of the better of FFT and LoRA (metrics are in [0, 1])


@dataclasses.dataclass(frozen=True)
class TaskSize:
    """How much of a task one run sees: generator size, steps of ``batch`` rows, eval split."""

    task_size: int
    steps: int
    batch: int
    val: int
    test: int
    max_length: int = 256


PRESETS = {
    # Sized for one H200 per two workers, about a minute per run with compilation. SQL
    # examples with their schema reach 448 Gemma tokens; med's 200 facts come in 4 training
    # wordings each (800 records, 5 epochs) and are asked in a fifth, held-out wording.
    "h200": {"sql": TaskSize(800, 100, 16, 64, 96, max_length=512),
             "med": TaskSize(200, 250, 16, 64, 136),
             "fact": TaskSize(256, 64, 16, 64, 192)},
    # Tiny sizes for the test suite (with a tiny model).
    "smoke": {"sql": TaskSize(24, 3, 4, 4, 4, 512),
              "med": TaskSize(8, 3, 4, 4, 4, 512),
              "fact": TaskSize(8, 3, 4, 4, 4, 512)},
}


@dataclasses.dataclass(frozen=True)
class Job:
    """One run: a method at one learning-rate scale on one task ('base' = no training)."""

    task: str
    method: str
    lr_scale: float | None
    model: str
    seed: int
    size: TaskSize

    @property
    def name(self) -> str:
        scale = "none" if self.lr_scale is None else f"{self.lr_scale:g}"
        return f"{self.task}__{self.method}__x{scale}"


def jobs_for(tasks, methods, scales, model, seed, preset) -> list[Job]:
    jobs = []
    for task in tasks:
        size = PRESETS[preset][task]
        jobs.append(Job(task, "base", None, model, seed, size))
        jobs += [Job(task, m, s, model, seed, size) for m in methods for s in scales]
    return jobs


# ---------------------------------------------------------------------------------------------
# One run (in its own process).


def primary_metrics(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """Adds the fact score (harmonic mean of efficacy, paraphrase, neighbourhood) for 'fact'."""
    out = dict(metrics)
    if task == "fact":
        parts = [metrics[k] for k in FACT_PARTS]
        out["fact_score"] = 0.0 if min(parts) <= 0 else len(parts) / sum(1 / p for p in parts)
    return out


def _peak_memory_gib() -> tuple[float, str]:
    import resource

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"


def _mean_of(rows: list[dict], key: str, last: int | None = None):
    values = [r[key] for r in rows if r.get(key) is not None]
    values = values[-last:] if last else values
    if not values:
        return None
    if isinstance(values[0], list):
        return [sum(v[i] for v in values) / len(values) for i in range(len(values[0]))]
    return sum(values) / len(values)


def run_job(job: Job, out_dir: Path) -> dict[str, Any]:
    """Trains (unless 'base'), evaluates on the validation and test splits, returns the row."""
    import jax

    from molf_jax import models
    from molf_jax.data import load_task
    from molf_jax.eval import evaluate_task
    from molf_jax.lora import merge_lora
    from molf_jax.run_dir import RunDir
    from molf_jax.train import TrainConfig, train
    from molf_jax.train.export import load_run
    from molf_jax.train.setup import build_params, load_tokenizer, resolve_model
    from molf_jax.train.mesh import make_mesh
    from molf_jax.train.platform import PLATFORM_DEFAULTS

    size = job.size
    run_dir = out_dir / "runs" / job.task / job.name.split("__", 1)[1]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    # One device per run, whatever the process sees (workers share GPUs by CUDA_VISIBLE_DEVICES).
    # float32, no remat, XLA attention on every platform: the numerics the published table
    # was measured with (the trainer's GPU defaults are bf16).
    common = dict(model=job.model, task=job.task, task_size=size.task_size, seed=job.seed,
                  batch_size=size.batch, max_length=size.max_length, out_dir=str(run_dir),
                  mesh="data=1,fsdp=1,tensor=1", **PLATFORM_DEFAULTS["cpu"])
    row: dict[str, Any] = {"task": job.task, "method": job.method, "lr_scale": job.lr_scale,
                           "seed": job.seed, "size": dataclasses.asdict(size)}
    started = time.time()
    if job.method == "base":
        config = TrainConfig(mode="fft", **common)
        source = resolve_model(job.model)
        params, _ = build_params(config, source, make_mesh(config.mesh),
                                 rng=jax.random.key(job.seed))
        tokenizer = load_tokenizer(source)
        model_config = source.config
    else:
        defaults = TrainConfig()
        config = TrainConfig(**common, **METHODS[job.method], steps=size.steps,
                             fft_lr=defaults.fft_lr * job.lr_scale,
                             lora_lr=defaults.lora_lr * job.lr_scale,
                             eval_before_after=False, export=False, keep_checkpoints=1)
        summary = train(config)
        row.update(fft_lr=config.fft_lr, lora_lr=config.lora_lr, steps=summary.steps,
                   tokens=summary.tokens, train_seconds=summary.seconds,
                   trainable_params=summary.trainable_params,
                   skipped_steps=summary.skipped_steps)
        logged = [json.loads(line) for line in open(RunDir(run_dir).metrics)]
        row["train_loss"] = _mean_of(logged, "loss", last=max(1, size.steps // 10))
        row["fft_fraction"] = _mean_of(logged, "fft_fraction")
        row["expert_fraction"] = _mean_of(logged, "expert_fraction")
        row["peak_memory_gib"], row["memory_kind"] = _peak_memory_gib()
        run = load_run(run_dir)
        # Evaluated merged, as exported: every method then runs the same evaluation programs
        # (one compilation, shared through the cache).
        params = merge_lora(run.params, run.lora) if run.lora else run.params
        params = jax.device_put(params, jax.devices()[0])
        tokenizer, model_config = run.tokenizer, run.model_config
        shutil.rmtree(RunDir(run_dir).checkpoints, ignore_errors=True)

    model = models.build_model(model_config, scan_layers=config.scan_layers)
    records = load_task(job.task, "offline", size=size.task_size, seed=job.seed).eval
    if len(records) < size.val + size.test:
        raise ValueError(f"{job.task}: {len(records)} evaluation records, fewer than val "
                         f"{size.val} + test {size.test}")
    splits = {"val": records[: size.val], "test": records[size.val: size.val + size.test]}
    for split, chosen in splits.items():
        result = evaluate_task(job.task, model, params, tokenizer, chosen,
                               batch_size=max(size.batch, 8))
        values = {k: float(v["value"]) for k, v in result.items()
                  if isinstance(v, dict) and "value" in v}
        row[split] = primary_metrics(job.task, values)
    row["wall_seconds"] = round(time.time() - started, 1)
    row["device"] = jax.devices()[0].device_kind
    return row


# ---------------------------------------------------------------------------------------------
# Choosing, checking, rendering (pure functions over rows).


def choose(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (task, method), the run with the best validation metric; ties: lower train loss,
    then smaller learning-rate scale."""
    best: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row["method"] == "base":
            continue
        key = (row["task"], row["method"])
        if key not in best or _rank(row) < _rank(best[key]):
            best[key] = row
    return best


def _rank(row: dict) -> tuple:
    loss = row.get("train_loss")
    return (-row["val"][PRIMARY[row["task"]]], float("inf") if loss is None else loss,
            row["lr_scale"])


def claims(chosen: dict[tuple[str, str], dict]) -> list[dict]:
    """The paper's two claims per task, on the chosen runs' test metrics."""
    out = []
    for task in TASKS:
        test = {m: chosen[(task, m)]["test"][PRIMARY[task]] for m in METHODS
                if (task, m) in chosen}
        entry: dict[str, Any] = {"task": task, "metric": PRIMARY[task]}
        if {"fft", "lora", "molf"} <= test.keys():
            better = max(test["fft"], test["lora"])
            entry["molf_minus_best_of_fft_lora"] = test["molf"] - better
            entry["molf_within_1_5_points"] = test["molf"] >= better - CLAIM_MARGIN
        if {"lora", "molfe"} <= test.keys():
            entry["molfe_minus_lora"] = test["molfe"] - test["lora"]
            entry["molfe_beats_lora"] = test["molfe"] > test["lora"]
        if len(entry) > 2:
            out.append(entry)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render(results: dict) -> str:
    """The README's tables (markdown) from a results.json dict."""
    rows = results["rows"]
    chosen = {(c["task"], c["method"]): c for c in results["chosen"]}
    base = {r["task"]: r for r in rows if r["method"] == "base"}
    lines = ["| task (metric, test n) | method | lr scale | test | val | test details | "
             "train loss | peak GiB | train s | routing |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        metric = PRIMARY[task]
        if task in base:
            b = base[task]
            lines.append(f"| {task} ({metric}, {b['size']['test']}) | base model | - | "
                         f"{_pct(b['test'][metric])} | {_pct(b['val'][metric])} | "
                         f"{_details(b)} | - | - | - | - |")
        for method in METHODS:
            c = chosen.get((task, method))
            if c is None:
                continue
            lines.append(
                f"| {task} | {method} | {c['lr_scale']:g} | {_pct(c['test'][metric])} | "
                f"{_pct(c['val'][metric])} | {_details(c)} | {c['train_loss']:.3f} | "
                f"{c['peak_memory_gib']:.1f} | {c['train_seconds']:.0f} | {_routing(c)} |")
    lines += ["", "| task | MoLF - max(FFT, LoRA) (points) | within 1.5? | "
                  "MoLF-E - LoRA (points) | MoLF-E beats LoRA? |", "|---|---|---|---|---|"]
    for claim in results["claims"]:
        lines.append(
            f"| {claim['task']} | {_signed(claim.get('molf_minus_best_of_fft_lora'))} | "
            f"{_yes(claim.get('molf_within_1_5_points'))} | "
            f"{_signed(claim.get('molfe_minus_lora'))} | {_yes(claim.get('molfe_beats_lora'))} |")
    sweep = {}
    for r in rows:
        if r["method"] != "base":
            sweep.setdefault((r["task"], r["method"]), []).append(r)
    lines += ["", "Sweep (validation metric per learning-rate scale):", "",
              "| task | method | " + " | ".join(f"x{s:g}" for s in results["lr_scales"]) + " |",
              "|---|---|" + "---|" * len(results["lr_scales"])]
    for (task, method), runs in sorted(sweep.items(), key=lambda kv: (
            TASKS.index(kv[0][0]), list(METHODS).index(kv[0][1]))):
        by_scale = {r["lr_scale"]: r["val"][PRIMARY[task]] for r in runs}
        lines.append(f"| {task} | {method} | " + " | ".join(
            _pct(by_scale.get(s)) for s in results["lr_scales"]) + " |")
    repeat = results.get("repeat_check")
    if repeat:
        lines += ["", f"Repeat check: {repeat['job']} rerun, metrics "
                      f"{'identical' if repeat['identical'] else 'DIFFERENT'}."]
    return "\n".join(lines)


def _details(row: dict) -> str:
    """The test metric's parts: fact's three scores, sql's exact match."""
    test = row["test"]
    if row["task"] == "fact":
        return " / ".join(f"{name} {_pct(test[key])}" for name, key in
                          zip(("efficacy", "paraphrase", "neighbourhood"), FACT_PARTS))
    if row["task"] == "sql":
        return f"exact match {_pct(test['exact_match'])}"
    return "-"


def _routing(row: dict) -> str:
    if row["method"] in ("molf", "molf_gate") and row.get("fft_fraction") is not None:
        return f"FFT chosen {100 * row['fft_fraction']:.0f}%"
    if row["method"] == "molfe" and row.get("expert_fraction"):
        return f"r128 chosen {100 * row['expert_fraction'][-1]:.0f}%"
    return "-"


def _signed(x):
    return "-" if x is None else f"{100 * x:+.1f}"


def _yes(x):
    return "-" if x is None else ("yes" if x else "no")


# ---------------------------------------------------------------------------------------------
# Orchestration.


def _worker_env(device: str | None, out_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out_dir / "jax_cache"))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def run_all(jobs: list[Job], out_dir: Path, workers: int, devices: list[str] | None) -> None:
    """Runs every job without a row yet, ``workers`` at a time; prints one line per run."""
    rows_dir = out_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (rows_dir / f"{j.name}.json").exists()]
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {len(todo)} to go; "
          f"{workers} at a time", flush=True)
    running: dict[int, tuple[Job, subprocess.Popen, float, Path]] = {}
    failed, done = [], 0
    queue = list(todo)
    while queue or running:
        while queue and len(running) < workers:
            slot = next(i for i in range(workers) if i not in running)
            job = queue.pop(0)
            log = out_dir / "logs" / f"{job.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            device = devices[slot % len(devices)] if devices else None
            spec = json.dumps(dataclasses.asdict(job))
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", spec, "--out-dir", str(out_dir)],
                stdout=open(log, "w"), stderr=subprocess.STDOUT, env=_worker_env(device, out_dir))
            running[slot] = (job, proc, time.time(), log)
        time.sleep(0.5)
        for slot, (job, proc, t0, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            done += 1
            prefix = f"[{done}/{len(todo)}] {job.name} ({time.time() - t0:.0f} s)"
            if proc.returncode:
                failed.append(job.name)
                tail = log.read_text().splitlines()[-15:]
                print(f"{prefix}: FAILED (exit {proc.returncode}); log {log}:\n  " +
                      "\n  ".join(tail), flush=True)
                continue
            row = json.loads((rows_dir / f"{job.name}.json").read_text())
            metric = PRIMARY[job.task]
            loss = row.get("train_loss")
            print(f"{prefix}: val {_pct(row['val'][metric])} test {_pct(row['test'][metric])}"
                  + ("" if loss is None else f" train loss {loss:.3f}"), flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed: {', '.join(failed)}")


def collect(jobs: list[Job], out_dir: Path, scales: list[float]) -> dict:
    rows = [json.loads((out_dir / "rows" / f"{j.name}.json").read_text()) for j in jobs]
    chosen = choose(rows)
    return {"command": " ".join(["python", "scripts/reproduce.py"] + sys.argv[1:]),
            "lr_scales": scales, "rows": rows, "chosen": list(chosen.values()),
            "claims": claims(chosen)}


def plot_chosen(results: dict, out_dir: Path) -> None:
    from molf_jax.viz import plot_run

    for c in results["chosen"]:
        if c["method"] in ("molf", "molfe", "molf_gate"):
            run_dir = out_dir / "runs" / c["task"] / f"{c['method']}__x{c['lr_scale']:g}"
            plot_run(run_dir, out_dir=out_dir / "plots" / f"{c['task']}_{c['method']}")


def check_repeat(results: dict, jobs: list[Job], out_dir: Path, device: str | None) -> dict:
    """Reruns one chosen molf run (fact's if it ran: the cheapest) in ``out_dir/repeat`` and
    compares its metric values and train loss; a repeat row already there is reused."""
    molf = {c["task"]: c for c in results["chosen"] if c["method"] == "molf"}
    target = molf[next(t for t in ("fact", "med", "sql") if t in molf)]
    job = next(j for j in jobs if (j.task, j.method, j.lr_scale) ==
               (target["task"], "molf", target["lr_scale"]))
    row_path = out_dir / "repeat" / "rows" / f"{job.name}.json"
    if not row_path.exists():
        row_path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(job)),
                        "--out-dir", str(out_dir / "repeat")], check=True,
                       env=_worker_env(device, out_dir))
    rerun = json.loads(row_path.read_text())
    keys = ("val", "test", "train_loss")
    return {"job": job.name, "identical": all(rerun[k] == target[k] for k in keys),
            "first": {k: target[k] for k in keys}, "second": {k: rerun[k] for k in keys}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default",
                   help="'default' (the embedded Gemma 3 270M) or an HF folder")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lr-scales", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    p.add_argument("--preset", default="h200", choices=list(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--devices", default=None,
                   help="comma-separated GPU ids to spread workers over (default: all visible "
                        "to each worker)")
    p.add_argument("--out-dir", default="reproduce_results")
    p.add_argument("--check-repeat", action="store_true",
                   help="rerun one chosen molf run and compare its metrics (determinism)")
    p.add_argument("--render", action="store_true",
                   help="only print the tables from OUT_DIR/results.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)

    if args.worker:
        spec = json.loads(args.worker)
        job = Job(**{**spec, "size": TaskSize(**spec["size"])})
        row = run_job(job, out_dir)
        rows_dir = out_dir / "rows"
        rows_dir.mkdir(parents=True, exist_ok=True)
        tmp = rows_dir / f".{job.name}.json"
        tmp.write_text(json.dumps(row, indent=1))
        tmp.rename(rows_dir / f"{job.name}.json")
        return
    if args.render:
        print(render(json.loads((out_dir / "results.json").read_text())))
        return

    if args.model == "default":
        from molf_jax.checkpoints import default_model_dir

        args.model = str(default_model_dir())  # convert once, before the workers start
    jobs = jobs_for(args.tasks, args.methods, args.lr_scales, args.model, args.seed,
                    args.preset)
    devices = args.devices.split(",") if args.devices else None
    started = time.time()
    run_all(jobs, out_dir, args.workers, devices)
    results = collect(jobs, out_dir, args.lr_scales)
    if args.check_repeat:
        results["repeat_check"] = check_repeat(results, jobs, out_dir,
                                               devices[0] if devices else None)
    results["wall_seconds"] = round(time.time() - started, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    plot_chosen(results, out_dir)
    print(render(results))
    print(f"\nresults: {out_dir / 'results.json'}; plots: {out_dir / 'plots'}")


if __name__ == "__main__":
    main()
