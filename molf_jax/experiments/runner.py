"""Runs a reproduction plan in one process: the model loaded once, one vmapped program per mode
configuration, every member scored in large batches, one row per (method, setting, seed).

Only what the results use is trained and scored: every setting on the first seed (validation
chooses among them, `molf_jax.experiments.stats.choose_settings`), and on later seeds only the
chosen setting. A program runs in two phases with one compilation of `program_width` members:
the first seed's members, then the chosen settings' later seeds (padded with repeats, which are
never scored).

Tasks run longest batches first, each task's base model scored while its first program
compiles (every program compiles in threads ahead). Rows are written to ``OUT/rows/*.json`` as
they come, so a killed sweep resumes where it stopped (a program whose needed rows all exist is
skipped). A chunk of members that fails is retried once, split in two halves when the device
ran out of memory; what still fails is listed in ``failed_runs``, never left out silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from molf_jax.experiments.plan import (PRESETS, Plan, Program, TaskSize, grid_labels, phases,
                                       program_width, programs)
from molf_jax.paths import write_replacing

__all__ = ["Runner", "collect", "row_name", "read_rows"]

# The interpreter's switch interval while programs compile in threads. A thread that traces and
# lowers a program keeps the GIL for up to the interval each time the main thread gives it up,
# and the main thread gives it up at every dispatch and device read: 1,000 small jitted calls
# took 0.016-0.024 s alone, 4.3-6.5 s beside one lowering thread with Python's default 5 ms, and
# 0.28-0.36 s with 0.1 ms (`python scripts/bench_dispatch.py`, two runs on the 2-core CI-like
# machine). In the 908 s sitting the GPU idled most of the first 330 s while four threads
# compiled.
COMPILING_SWITCH_INTERVAL = 1e-4


def row_name(row: dict) -> str:
    return f"{row['task']}__{row['method']}__{row['label']}__s{row['seed']}".replace(":", "-")


def read_rows(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(out_dir) / "rows").glob("*.json"))]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class TaskData:
    """A task's data for every seed: encoded training examples and the evaluation splits."""

    size: TaskSize
    train: dict[int, list]
    val: dict[int, list[dict]]
    test: dict[int, list[dict]]

    @property
    def length(self) -> int:
        """One padded batch length for the whole task (its longest example, rounded up to 16):
        one compilation per program, where the trainer's four lengths would compile four."""
        longest = max(len(e) for examples in self.train.values() for e in examples)
        return -(-longest // 16) * 16


class Runner:
    """Loads the model once and runs plans against it.

    Args:
      model: 'default' (the embedded Gemma 3 270M) or an HF folder.
      out_dir: where rows, results.json and plots go.
      compute_dtype: activations of training ('bfloat16' on GPUs; tests use float32).
      retention: score the forgetting probe after every run.
      compile_ahead: programs compiled in threads while another trains.
      compile_nice: CPU priority of those threads (and of the worker processes), as ``nice``
        (0: the process's; 10: they, and the threads the compiler starts from them, yield the
        CPUs to the main thread that feeds the GPU). `python scripts/bench_contention.py`
        measures whether that helps.
      compile_processes: when above 0, each program is compiled in one of this many worker
        processes and its executables loaded here (`molf_jax.experiments.compile_workers`):
        the threads then neither lower nor compile. A program whose worker fails compiles in
        its thread. The workers allocate device memory on demand, so leave them some:
        ``reproduce.py`` lets this process take 0.7 of the GPU instead of 0.95
        (`molf_jax.device_memory.use_device_memory`).
      remat: rematerialisation of the layers while training, or candidates in order of
        preference: the first with which a program's members fit is used ('full' trades
        compute for the memory of more members per program), and only when none fits are
        the members split.
      reserve_gib: device memory kept free of a program's members (base model, scoring).
      headroom: share of the device's memory a program may plan to use, reserve included.
    """

    def __init__(self, model: str, out_dir: str | os.PathLike, *, compute_dtype: str,
                 retention: bool = True, compile_ahead: int = 4, compile_nice: int = 0,
                 compile_processes: int = 0,
                 remat: str | Sequence[str] = "none",
                 reserve_gib: float = 8.0, headroom: float = 0.85):
        from molf_jax import models
        from molf_jax.checkpoints import load_hf
        from molf_jax.train.setup import load_tokenizer, resolve_model

        self.out_dir = Path(out_dir)
        (self.out_dir / "rows").mkdir(parents=True, exist_ok=True)
        self.compute_dtype = compute_dtype
        self.retention = retention
        self.compile_ahead, self.compile_nice = compile_ahead, compile_nice
        self.compile_processes, self._workers = compile_processes, None
        self.remats = (remat,) if isinstance(remat, str) else tuple(remat)
        self.reserve_bytes, self.headroom = int(reserve_gib * 2**30), headroom
        started = time.time()
        self.source = resolve_model(model)
        if self.source.hf_dir is None:
            raise ValueError(f"--model {model!r}: the reproduction needs a model with weights "
                             "(an HF folder or 'default')")
        self.model_dir = str(self.source.hf_dir)
        self.tokenizer = load_tokenizer(self.source)
        # float32 weights and Adam states: bf16 weights lose updates below their resolution,
        # which the rate grid's smallest rates (2e-5) would hit.
        _, self.base_params = load_hf(self.source.hf_dir, scan_layers=True)
        self.eval_model = models.build_model(self.source.config, scan_layers=True)
        import jax

        self.device = jax.devices()[0].device_kind
        self.timings: dict[str, Any] = {"load_seconds": round(time.time() - started, 1),
                                        "programs": {}}
        self.failed: list[str] = []
        # First-seed rows (task, method, label, seed, val) seen so far: they choose the setting
        # whose later seeds are scored.
        self._first_rows: list[dict] = []
        self._first_seed: int | None = None
        # Wall time of the plan: the first program's start to the last row written.
        self.first_start: float | None = None
        self._clock = time.time()
        self.last_row: float | None = None

    # -- data ---------------------------------------------------------------------------------

    def task_data(self, task: str, preset: str, seeds) -> TaskData:
        from molf_jax.data import encode_records, load_task

        size = PRESETS[preset][task]
        out = TaskData(size, {}, {}, {})
        for seed in seeds:
            extra = {"eval_size": size.eval_size} if task == "sql" and size.eval_size else {}
            data = load_task(task, "offline", size=size.task_size, seed=seed,
                             offline_options=dict(size.offline_options) or None, **extra)
            encoded, _ = encode_records(task, data.train, self.tokenizer,
                                        max_length=size.max_length, overflow="drop",
                                        protocol=data.protocol)
            test = len(data.eval) - size.val if size.test is None else size.test
            if len(data.eval) < size.val + test or test < 1:
                raise ValueError(f"{task}: {len(data.eval)} evaluation records, fewer than val "
                                 f"{size.val} + test {test}")
            out.train[seed] = encoded
            out.val[seed] = data.eval[:size.val]
            out.test[seed] = data.eval[size.val:size.val + test]
        return out

    def probe(self):
        from molf_jax.data import forgetting_probe

        if not hasattr(self, "_probe"):
            self._probe = forgetting_probe()
        return self._probe

    # -- scoring ------------------------------------------------------------------------------

    def score(self, task: str, params, data: TaskData, seed: int) -> dict[str, Any]:
        from molf_jax.experiments.scoring import case_scores
        from molf_jax.experiments.stats import metric_of

        # Validation and test in one call: few, large passes (the task's ``score_batch``).
        val = len(data.val[seed])
        cases = case_scores(task, self.eval_model, params, self.tokenizer,
                            data.val[seed] + data.test[seed], batch_size=data.size.score_batch)
        row: dict[str, Any] = {
            "val": metric_of(task, {k: v[:val] for k, v in cases.items()}),
            "test_cases": {k: v[val:] for k, v in cases.items()}}
        row["test"] = metric_of(task, row["test_cases"])
        if self.retention:
            from molf_jax.eval import retained_facts

            probe = self.probe()
            retained = retained_facts(self.eval_model, params, self.tokenizer, probe,
                                      batch_size=-(-len(probe) // 64) * 64)
            row["test_cases"]["retained"] = [int(r) for r in retained]
            row["retention"] = 100 * float(np.mean(retained))
        row["n_test"] = len(data.test[seed])
        return row

    # -- one program ----------------------------------------------------------------------------

    def _config(self, program: Program, size: TaskSize, steps: int | None):
        from molf_jax.train import PLATFORM_DEFAULTS, TrainConfig

        return TrainConfig(
            model=self.model_dir, task=program.task, task_size=size.task_size, batch_size=32,
            grad_accum=1, epochs=size.epochs, steps=steps, max_length=size.max_length,
            out_dir=str(self.out_dir / "unused"), mesh="data=1,fsdp=1,tensor=1",
            eval_before_after=False, export=False,
            **{**PLATFORM_DEFAULTS["cpu"], "compute_dtype": self.compute_dtype,
               "remat": self.remats[-1]},
            **program.settings)

    def compiled(self, program: Program, data: TaskData, steps: int | None):
        """The program compiled for as many members as fit the device, at most its
        `program_width` (a `MemberProgram`, callable from a thread).

        The compiler's own memory analysis of the step (arguments, outputs and temporaries)
        decides: each remat candidate is tried in order, and while none fits (less a reserve
        for the base model and scoring), the width is halved.
        """
        from molf_jax.data import pad_token_id
        from molf_jax.experiments.compile_workers import CompileJob
        from molf_jax.experiments.sweep import (MemberProgram, member_batches,
                                                member_loss_tokens)

        config = self._config(program, data.size, steps)
        members = list(program.members)
        _, total = member_batches(config, [data.train[m.seed] for m in members], members,
                                  pad_id=pad_token_id(self.tokenizer), lengths=(data.length,))
        shape = (config.grad_accum, config.batch_size, data.length)
        # The output head runs on the target positions alone (a bound over every batch).
        budget = member_loss_tokens(config, [data.train[m.seed] for m in members])
        built: dict[tuple[int, str], Any] = {}

        def build(k: int, remat: str):
            if (k, remat) not in built:
                serialized = None
                if self._workers is not None:
                    serialized = self._compile_in_worker(program, CompileJob(
                        self.model_dir, dataclasses.replace(config, remat=remat), k, total,
                        shape, budget, tuple(data.size.compiler_options)), f"{k}/{remat}")
                started = time.time()
                member_program = MemberProgram(
                    dataclasses.replace(config, remat=remat), self.source.config,
                    self.base_params, k, total, shape, loss_tokens=budget)
                built[k, remat] = (member_program.load(serialized) if serialized is not None
                                   else member_program.compile(dict(data.size.compiler_options)))
                timing = self.timings["programs"].setdefault(program.name, {})
                # Seconds in this process: compiling, or loading a worker's executables.
                timing.setdefault("compile_seconds", {})[f"{k}/{remat}"] = round(
                    time.time() - started, 1)
                timing.setdefault("compiled_by", {})[f"{k}/{remat}"] = (
                    "worker" if serialized is not None else "thread")
            return built[k, remat]

        k = program_width(program, self._first_seed)
        # The task's own candidates where it knows some cannot fit (a wasted compile each).
        remats = [r for r in self.remats if r in (data.size.remat or self.remats)] or self.remats
        while True:
            fitting = next((r for r in remats if self._fits(build(k, r))), None)
            if fitting is not None or k == 1:
                remat = fitting or remats[-1]
                break
            k = -(-k // 2)
        timing = self.timings["programs"].setdefault(program.name, {})
        timing["remat"] = remat
        if hasattr(os, "getpriority"):
            timing["compile_thread_nice"] = os.getpriority(os.PRIO_PROCESS,
                                                           threading.get_native_id())
        built_program = build(k, remat)
        timing["compiled_at"] = self._since_start()
        _say(f"[{timing['compiled_at']:.0f} s] {program.name}: compiled for {k} members "
             f"(remat {remat}; {', '.join(f'{s} s' for s in timing['compile_seconds'].values())})")
        return built_program

    def _compile_in_worker(self, program: Program, job, key: str) -> bytes | None:
        """``job`` compiled in a worker process: its executables (`MemberProgram.serialize`),
        or None when the worker failed (reported; the thread then compiles it itself)."""
        from molf_jax.experiments.compile_workers import compile_job

        try:
            seconds, serialized = self._workers.submit(compile_job, job).result()
        except Exception as error:  # noqa: BLE001 - the thread compiles it itself
            _say(f"{program.name}: worker compile failed ({type(error).__name__}: "
                 f"{str(error)[:300]}); compiling here")
            return None
        timing = self.timings["programs"].setdefault(program.name, {})
        timing.setdefault("worker_compile_seconds", {})[key] = round(seconds, 1)
        return serialized

    def _fits(self, program) -> bool:
        import jax

        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            return True  # CPU: no limit known
        m = program.step.memory_analysis()
        need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)
        # Headroom: a step the analysis fits into all but the reserve still failed once to
        # find a contiguous 27 GiB buffer in the fragmented heap (sql__molf, 6 members).
        return need + self.reserve_bytes <= self.headroom * stats["bytes_limit"]

    def run_program(self, program: Program, data: TaskData, *, steps: int | None = None,
                    members=None, compiled=None) -> list[dict]:
        """Trains the program's members (or the given subset) and returns their rows."""
        import jax

        from molf_jax.adalora import apply_rank_pattern
        from molf_jax.data import pad_token_id
        from molf_jax.experiments.sweep import member_params, train_members
        from molf_jax.train import merge_adapters, mode_of

        members = list(members or program.members)
        config = self._config(program, data.size, steps)
        # A compiled program of more members than this chunk: pad with repeats (not scored).
        padded = members + [members[i % len(members)] for i in
                            range((compiled.num_members if compiled else 0) - len(members))]
        started = time.time()
        self.first_start = self.first_start or started
        result = train_members(config, self.source.config, self.base_params,
                               [data.train[m.seed] for m in padded], padded,
                               pad_id=pad_token_id(self.tokenizer), lengths=(data.length,),
                               program=compiled)
        trained = time.time()
        rows = []
        scored_members = 0
        # First-seed members first: their validation chooses which later seeds to score.
        for k in sorted(range(len(members)), key=lambda i: members[i].seed != self._first_seed):
            member = members[k]
            index = program.members.index(member)
            wanted = [(method, label) for method, label in program.methods[index]
                      if self.needed(program.task, method, label, member.seed)]
            if not wanted:
                continue
            scored_members += 1
            params = member_params(result, k)
            if mode_of(config).adapter == "adalora":
                params = apply_rank_pattern(params, jax.tree.map(lambda x: x[k],
                                                                 result.opt_state))
            params = merge_adapters(params, result.spec)
            scored = self.score(program.task, params, data, member.seed)
            losses = result.losses[:, k]
            finite = losses[np.isfinite(losses)]
            common = {"task": program.task, "seed": member.seed, "mode": config.mode,
                      "fft_lr": member.fft_lr, "lora_lr": member.lora_lr,
                      "top_k": config.routing_top_k, "score": config.score,
                      "steps": result.steps, "tokens": int(result.tokens[k]),
                      "skipped_steps": int(np.sum(~np.isfinite(losses))),
                      "train_loss": float(np.mean(finite[-max(1, len(finite) // 10):]))
                      if len(finite) else None,
                      "routing": _routing_summary(result, k, config.mode), **scored}
            for method, label in wanted:
                rows.append({**common, "method": method, "label": label,
                             "setting": {"mode": config.mode, "fft_lr": member.fft_lr,
                                         "lora_lr": member.lora_lr}})
                if member.seed == self._first_seed:
                    self._first_rows.append({"task": program.task, "method": method,
                                             "label": label, "seed": member.seed,
                                             "val": scored["val"]})
        del result
        timing = self.timings["programs"].setdefault(program.name, {})
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            timing["peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 1)
        timing.update(members=timing.get("members", 0) + len(members),
                      scored=timing.get("scored", 0) + scored_members,
                      train_seconds=round(timing.get("train_seconds", 0) + trained - started, 1),
                      score_seconds=round(timing.get("score_seconds", 0) + time.time() - trained,
                                          1))
        return rows

    def needed(self, task: str, method: str, label: str, seed: int) -> bool:
        """Whether the results use this row: every setting on the first seed; on a later seed
        only the setting the first seed's validation chose (`choose_settings`), and for a
        method outside the tuned grids (the routing study) its one setting."""
        from molf_jax.experiments.stats import choose_settings

        grids = grid_labels()
        if seed == self._first_seed or method not in grids:
            return True
        chosen = choose_settings([r for r in self._first_rows if r["task"] == task], grids,
                                 seed=self._first_seed).get((task, method))
        if chosen is None:
            raise RuntimeError(f"{task} {method}: seed {seed} is scored before the first seed "
                               f"chose a setting (first-seed members run first)")
        return label == chosen

    def base_row(self, task: str, data: TaskData, seed: int) -> dict:
        scored = self.score(task, self.base_params, data, seed)
        return {"task": task, "method": "base", "label": "base", "setting": {"mode": "base"},
                "seed": seed, **scored}

    # -- the plan -----------------------------------------------------------------------------

    def run(self, plan: Plan, *, steps: int | None = None) -> list[dict]:
        """Runs every program of ``plan`` that has rows missing; returns all rows on disk.

        Every task's data is made first; tasks run longest batches first, and all programs go to
        the compile threads at once in that order, so the next programs compile while one
        trains.
        """
        first = self._first_seed = plan.seeds[0]
        on_disk = read_rows(self.out_dir)
        have = {row_name(r) for r in on_disk}
        self._first_rows = [r for r in on_disk if r["seed"] == first and "val" in r]

        def done(task: str, p: Program) -> bool:
            pairs = [(s.seed, m, lab) for s, ms in zip(p.members, p.methods) for m, lab in ms]
            firsts = [x for x in pairs if x[0] == first]
            if not all(row_name({"task": task, "method": m, "label": lab, "seed": s})
                       in have for s, m, lab in firsts):
                return False
            return all(row_name({"task": task, "method": m, "label": lab, "seed": s})
                       in have for s, m, lab in pairs if self.needed(task, m, lab, s))

        work = []
        for task in plan.tasks:
            todo = [p for p in programs(plan, task) if not done(task, p)]
            base_done = row_name({"task": task, "method": "base", "label": "base",
                                  "seed": first}) in have
            if not todo and base_done:
                continue
            t0 = time.time()
            data = self.task_data(task, plan.preset, plan.seeds)
            timing = self.timings.setdefault("tasks", {}).setdefault(task, {})
            timing["data_seconds"] = round(time.time() - t0, 1)
            _say(f"{task}: data ready ({time.time() - t0:.1f} s); {len(todo)} programs")
            work.append((task, data, todo, base_done))
        # Longest batches first: their steps keep the GPU busy however slowly the host
        # dispatches while the compile threads run; short-step tasks come once most compiles
        # are done. (Order does not change any row.)
        work.sort(key=lambda w: -w[1].length)
        self.timings["task_order"] = [task for task, *_ in work]
        # The timeline (``*_at``: seconds since this point) shows where the GPU waited.
        self._clock = time.time()
        # Programs compile in threads ahead of the one training (XLA compiles on the host).
        if self.compile_processes:
            from molf_jax.experiments.compile_workers import worker_pool

            self._workers = worker_pool(self.compile_processes, nice=self.compile_nice)
        pool = ThreadPoolExecutor(max_workers=self.compile_ahead,
                                  initializer=self._lower_priority)
        futures = {p.name: pool.submit(self.compiled, p, data, steps)
                   for _, data, todo, _ in work for p in todo}
        switch = sys.getswitchinterval()
        sys.setswitchinterval(COMPILING_SWITCH_INTERVAL)
        try:
            for task, data, todo, base_done in work:
                if not base_done:
                    # The base model's scores (with the scoring functions' first compilations)
                    # while the task's first program compiles.
                    self.first_start = self.first_start or time.time()
                    t1 = time.time()
                    self._write([self.base_row(task, data, first)])
                    self.timings["tasks"][task].update(base_seconds=round(time.time() - t1, 1),
                                                       base_done_at=self._since_start())
                    self._write_timings()
                for program in todo:
                    self._write(self._run_phases(program, data, steps,
                                                 futures.pop(program.name)))
        finally:
            for future in futures.values():
                future.cancel()
            pool.shutdown()
            if self._workers is not None:
                self._workers.shutdown(cancel_futures=True)
                self._workers = None
            sys.setswitchinterval(switch)
        return read_rows(self.out_dir)

    def _lower_priority(self) -> None:
        """A compile thread's start: its nice value raised by ``compile_nice`` (Linux: per
        thread, inherited by the threads it starts)."""
        if self.compile_nice and hasattr(os, "setpriority"):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid,
                           os.getpriority(os.PRIO_PROCESS, tid) + self.compile_nice)

    def _run_phases(self, program: Program, data: TaskData, steps, future) -> list[dict]:
        """The program's first-seed members, then the later seeds of the settings they chose,
        in chunks of the compiled width; returns their rows."""
        t0 = time.time()
        try:
            compiled = future.result()
        except Exception as error:  # noqa: BLE001 - each chunk then compiles at its own size
            _say(f"{program.name}: compiling failed ({type(error).__name__}: "
                 f"{str(error)[:300]}); each chunk compiles for itself")
            compiled = None
        timing = self.timings["programs"].setdefault(program.name, {})
        timing["compile_wait_seconds"] = round(time.time() - t0, 1)
        timing["started_at"] = round(t0 - self._clock, 1)
        first, later = phases(program, self._first_seed)
        rows = self._run_chunks(program, data, steps, first, compiled)
        chosen = []
        for m in later:
            try:
                if any(self.needed(program.task, method, label, m.seed)
                       for method, label in program.methods[program.members.index(m)]):
                    chosen.append(m)
            except RuntimeError:  # every first-seed run of the method failed: nothing chosen
                self.failed.append(f"{program.name}:s{m.seed}:{m.fft_lr:g}/{m.lora_lr:g}")
        later = chosen
        rows += self._run_chunks(program, data, steps, later, compiled)
        best: dict[str, list[float]] = {}
        for r in rows:
            best.setdefault(r["method"], []).append(r["test"])
        timing["finished_at"] = self._since_start()
        _say(f"[{timing['finished_at']:.0f} s] {program.name}: {len(first)} + {len(later)} "
             f"members in {time.time() - t0:.0f} s (compile wait "
             f"{timing['compile_wait_seconds']:.0f}, train {timing.get('train_seconds', 0):.0f}, "
             f"score {timing.get('score_seconds', 0):.0f}); "
             + ", ".join(f"{m} test {np.mean(v):.1f}" for m, v in best.items()))
        self._write_timings()
        return rows

    def _write_timings(self) -> None:
        """``timings.json`` in the output folder, rewritten after each program, so that a run
        stopped before ``results.json`` still shows where its time went."""
        # Compile threads add to the timings meanwhile: json's C encoder (no indent) reads them
        # in one call that runs no Python code, so no thread changes them halfway.
        snapshot = json.loads(json.dumps(self.timings))
        write_replacing(self.out_dir / "timings.json", json.dumps(snapshot, indent=1))

    def _run_chunks(self, program: Program, data: TaskData, steps, members: list,
                    compiled) -> list[dict]:
        """``members`` in chunks of the compiled width (the last padded); a chunk that fails is
        retried once, in two halves when the device ran out of memory."""
        width = compiled.num_members if compiled is not None else max(1, len(members))
        rows = []
        for start in range(0, len(members), width):
            chunk = members[start:start + width]
            self.timings["programs"][program.name].setdefault("chunks", []).append(len(chunk))
            try:
                rows += self.run_program(program, data, steps=steps, members=chunk,
                                         compiled=compiled)
                continue
            except Exception as error:  # noqa: BLE001 - reported, retried, then listed
                memory = ("RESOURCE_EXHAUSTED" in str(error)
                          or "out of memory" in str(error).lower())
                split = memory and len(chunk) > 1
                _say(f"{program.name}: failed ({type(error).__name__}: {str(error)[:300]}); "
                     f"retrying{' in two halves' if split else ''}")
            halves = [chunk[:len(chunk) // 2], chunk[len(chunk) // 2:]] if split else [chunk]
            for part in halves:
                try:  # compiled at the part's own size
                    rows += self.run_program(program, data, steps=steps, members=part)
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    self.failed += [f"{program.name}:s{m.seed}:{m.fft_lr:g}/{m.lora_lr:g}"
                                    for m in part]
        return rows

    def _write(self, rows: list[dict]) -> None:
        for row in rows:
            row.setdefault("device", self.device)
            write_replacing(self.out_dir / "rows" / f"{row_name(row)}.json", json.dumps(row))
        self.last_row = time.time()

    def _since_start(self) -> float:
        return round(time.time() - self._clock, 1)

    @property
    def plan_wall_seconds(self) -> float | None:
        if self.first_start is None or self.last_row is None:
            return None
        return round(self.last_row - self.first_start, 1)


def _routing_summary(result, k: int, mode: str) -> dict[str, Any] | None:
    """Share of module-steps that chose the counted expert (molf: FFT; molfe: the last, the
    highest rank), per projection type over steps and overall."""
    from molf_jax.train import mode_of
    from molf_jax.viz._runlog import projection_of

    if result.winners is None:
        return None
    winners = result.winners[:, k].astype(float)  # [steps, modules, experts]
    column = 0 if mode_of(mode).fft_expert else winners.shape[-1] - 1
    by_projection: dict[str, list[int]] = {}
    for i, name in enumerate(result.module_names):
        by_projection.setdefault(projection_of(name), []).append(i)
    return {"expert": "fft" if column == 0 else f"lora_{column}",
            "steps": list(range(1, winners.shape[0] + 1)),
            "share_by_projection": {p: np.round(winners[:, idx, column].mean(1), 4).tolist()
                                    for p, idx in sorted(by_projection.items())},
            "share": round(float(winners[:, :, column].mean()), 4)}


def collect(out_dir: Path, seeds, *, command: str, plan_wall_seconds: float | None,
            failed_runs: list[str], timings: dict | None = None,
            preset: str = "gpu") -> tuple[dict, list[dict]]:
    """results.json's content from the rows on disk: the summary per task, the routing study,
    and the record of the run itself (command, device, wall time, failed runs, timings)."""
    from molf_jax.experiments.stats import study_table, summarise

    rows = read_rows(out_dir)
    grids = grid_labels()
    devices = sorted({r["device"] for r in rows if r.get("device")})
    results = {"command": command, "device": ", ".join(devices) or None,
               "runs": len(rows), "plan_wall_seconds": plan_wall_seconds,
               "failed_runs": list(failed_runs), "timings": timings or {},
               "tasks": summarise(rows, seeds, grids, with_retention=True),
               "study": study_table(rows, seeds, grids)}
    sql = results["tasks"].get("sql")
    if sql is not None and preset in PRESETS:
        from molf_jax.experiments.breakdown import sql_by_kind

        sql["by_kind"] = sql_by_kind(sql, rows, preset)
    return results, rows
