"""The training run: data, model, mesh, optimizer, the jitted step in a loop, checkpoints, logs,
evaluation before and after, and the exports.

The loop never waits on the device inside a step: metrics of step t are read back after step
t+1 has been dispatched, so logging overlaps compute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from molf_jax.adalora import (apply_rank_pattern, find_allocator_state, rank_module_names,
                              rank_pattern)
from molf_jax.data import (PROTOCOL_SETTINGS, BatchIterator, encode_records, fixed_lengths,
                           load_task, pad_token_id)
from molf_jax.paths import writable_folder, write_replacing
from molf_jax.run_dir import RunDir, claimed
from molf_jax.param_roles import expert_labels, split_trainable
from molf_jax.routing import routing_table
from molf_jax.train.checkpoint import RunCheckpointer, check_step_count
from molf_jax.train.config import ConfigError, TrainConfig
from molf_jax.train.mesh import batch_sharding, on_mesh
from molf_jax.train.plan import RunPlan, plan_run
from molf_jax.train.setup import Run, assemble_run, model_identity, training_step
from molf_jax.trees import count_params, join_trees
from molf_jax.train.runlog import RunLog

logger = logging.getLogger(__name__)

__all__ = ["train", "RunSummary", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclasses.dataclass
class RunSummary:
    """What a finished run reports (also written to ``summary.json``)."""

    mode: str
    model: str
    steps: int
    tokens: int
    seconds: float
    trainable_params: int
    total_params: int
    final_loss: float | None
    skipped_steps: int
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    run_dir: str
    merged_dir: str | None = None
    adapter_dir: str | None = None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare_data(config: TrainConfig, tokenizer):
    """Training examples (encoded) and evaluation records of the task, under its protocol."""
    data = load_task(config.task, config.source, size=config.task_size, seed=config.seed,
                     protocol=config.data_protocol)
    encoded, stats = encode_records(config.task, data.train, tokenizer,
                                    max_length=config.length_cap, overflow=config.overflow,
                                    protocol=data.protocol)
    if stats.dropped or stats.truncated:
        _say(f"data: {stats.kept} examples kept, {stats.truncated} truncated, {stats.dropped} "
             f"dropped for exceeding --max-length {config.length_cap} ({config.overflow})")
    if not encoded:
        raise ConfigError(f"task {config.task!r} from {config.source!r} has no training "
                          "examples left (empty dataset, or all longer than --max-length)")
    return encoded, data.eval


def evaluate(config: TrainConfig, model, params, tokenizer, records) -> dict[str, float]:
    from molf_jax.eval import evaluate_task

    records = records[: config.eval_limit]
    if not records:
        return {}
    result = evaluate_task(config.task, model, params, tokenizer, records,
                           batch_size=config.batch_size, protocol=config.data_protocol)
    return {name: float(v["value"]) for name, v in result.items()
            if isinstance(v, dict) and "value" in v}


def _stack_micro(batches: list[dict]) -> dict[str, np.ndarray]:
    length = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for key in ("input_ids", "attention_mask", "loss_mask"):
        out[key] = np.stack([np.pad(b[key], ((0, 0), (0, length - b[key].shape[1])))
                             for b in batches]).astype(np.int32)
    return out


def _to_devices(array: np.ndarray, sharding) -> jax.Array:
    # Each process supplies only its own shards (multi-host safe).
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def total_optimizer_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil(config.epochs * steps_per_epoch / config.grad_accum))


def train(config: TrainConfig) -> RunSummary:
    """Runs one training job end to end; see `TrainConfig` for every setting.

    The job is five steps: resolve the config into a plan (`plan_run`), assemble the run
    (`assemble_run`, data, optimizer), resume or start, fit, and finish (evaluation, export,
    summary).

    Example:
      >>> summary = train(TrainConfig(mode="molf", model="qwen2.5-0.5b", steps=10))  # doctest: +SKIP
    """
    plan = plan_run(config)
    run_dir = RunDir(writable_folder(plan.config.out_dir, "--out-dir"))  # before any weight
    with claimed(run_dir, "train", fresh=not plan.config.resume, lock=plan.primary, say=_say):
        for note in plan.notes:
            _say(note)
        job = _assemble(plan, run_dir)
        _resume_or_start(job)
        log = _open_log(job)
        eval_before = job.before.eval_before
        if job.config.eval_before_after and job.start_step == 0:
            eval_before = _timed_evaluation("before", job)
        totals = _fit(job, log, eval_before)
        eval_after = _timed_evaluation("after", job) if job.config.eval_before_after else None
        return _finish(job, totals, eval_before, eval_after)


@dataclasses.dataclass
class _Job:
    """A planned run while it trains: what the five steps of `train` hand to each other."""

    plan: RunPlan
    run: Run
    run_dir: RunDir
    examples: int
    eval_records: list
    iterator: BatchIterator
    total_steps: int
    optimizer: Any
    schedules: dict
    params: Any
    opt_state: Any
    identity: dict
    checkpointer: RunCheckpointer
    start_step: int = 0
    before: "_RunTotals" = None

    @property
    def config(self) -> TrainConfig:
        return self.plan.config


def _assemble(plan: RunPlan, run_dir: RunDir) -> _Job:
    """The run (`assemble_run`), its data, optimizer and fresh optimizer state."""
    config = plan.config
    run = assemble_run(plan)
    encoded, eval_records = prepare_data(config, run.tokenizer)
    # A few fixed batch lengths (the cap and its halvings; the longest example's without a
    # cap): the step compiles at most four times, whatever the data.
    iterator = BatchIterator(
        encoded, batch_size=config.batch_size, pad_id=pad_token_id(run.tokenizer),
        seed=config.seed, max_length=config.length_cap,
        bucket_batches=PROTOCOL_SETTINGS[config.data_protocol].bucket_batches,
        lengths=fixed_lengths(config.length_cap or max(len(e) for e in encoded)))
    total_steps = total_optimizer_steps(config, iterator.steps_per_epoch)
    optimizer, schedules = plan.mode.optimizer(config, total_steps, run.roles)
    trainable, _ = split_trainable(run.params, run.roles)
    opt_state = on_mesh(jax.jit(optimizer.init)(trainable), plan.mesh)
    return _Job(plan=plan, run=run, run_dir=run_dir, examples=len(encoded),
                eval_records=eval_records, iterator=iterator, total_steps=total_steps,
                optimizer=optimizer, schedules=schedules, params=run.params,
                opt_state=opt_state, identity=model_identity(config, run.source, run.params),
                checkpointer=RunCheckpointer(run_dir, keep=config.keep_checkpoints),
                before=_RunTotals())


def _resume_or_start(job: _Job) -> None:
    """Restores the latest checkpoint under ``--resume`` (`claimed` has already refused a
    used directory to a fresh run), then writes the run's config."""
    config, run_dir, checkpointer = job.config, job.run_dir, job.checkpointer
    if config.resume and checkpointer.latest_step() is None and run_dir.config.is_file():
        _say(f"--resume: {run_dir} has no finished checkpoint; starting the run again from "
             "step 0 (its logs are cleared)")
    elif config.resume:
        trainable, frozen = split_trainable(job.params, job.run.roles)
        trainable, opt_state, meta = checkpointer.restore(trainable, job.opt_state,
                                                          identity=job.identity, say=_say)
        job.params = join_trees(trainable, frozen)
        job.opt_state = on_mesh(opt_state, job.plan.mesh)
        job.iterator.restore(meta["data"])
        job.start_step, job.before = int(meta["step"]), _RunTotals.from_meta(meta)
        _say(f"resuming {run_dir} at step {job.start_step}")
        check_step_count(meta, job.total_steps, reschedule=config.reschedule, say=_say)
    if job.plan.primary:
        write_replacing(run_dir.config, json.dumps(config.to_dict(), indent=1))


def _open_log(job: _Job) -> RunLog:
    """The run's step logs (the routing table and rank modules at their head), and the line
    that says what trains."""
    config, run, mode = job.config, job.run, job.plan.mode
    log = RunLog(job.run_dir, tensorboard=config.tensorboard,
                 resume_step=job.start_step if config.resume else None, write=job.plan.primary)
    trainable, _ = split_trainable(job.params, run.roles)
    if mode.routes:
        table = routing_table(expert_labels(run.roles), trainable)
        log.write_routing_table(table.module_names, mode.expert_names(config), table.valid)
    allocator = find_allocator_state(job.opt_state)
    if allocator is not None:
        log.write_rank_modules(rank_module_names(allocator), config.ranks[0])
    source = run.source
    _say(f"{config.mode}: {source.name} ({type(source.config).__name__}), "
         f"{count_params(trainable):,} of {count_params(job.params):,} parameters train; task "
         f"{config.task} ({config.source}, protocol {config.data_protocol}), {job.examples} "
         f"examples, {job.total_steps} optimizer steps of "
         f"{config.batch_size} x {config.grad_accum} rows; mesh {dict(job.plan.mesh.shape)}")
    return log


def _timed_evaluation(when: str, job: _Job) -> dict[str, float]:
    t0 = time.time()
    metrics = evaluate(job.config, job.run.model, job.params, job.run.tokenizer,
                       job.eval_records)
    _say(f"eval {when}: {_fmt(metrics)} ({time.time() - t0:.0f}s)")
    return metrics


def _fit(job: _Job, log: RunLog, eval_before: dict | None) -> "_RunTotals":
    """The training loop from the start step: one jitted step per optimizer step, read back
    one step behind, checkpoints by step count and by time, the last step always saved."""
    config, run, total_steps = job.config, job.run, job.total_steps
    step_fn = training_step(config, run.model, job.optimizer, run.roles, job.params,
                            job.opt_state)
    sharding = batch_sharding(job.plan.mesh)
    progress = _progress(total_steps, job.start_step)
    readback = _Readback(config, log, progress, job.schedules, total_steps, job.before)
    started = last_save = time.time()

    def save(step):
        nonlocal last_save
        # Every step up to this one is logged before its checkpoint exists (the transaction
        # log a resume cuts back to).
        readback.drain(keep=0)
        readback.flush_interval()
        log.flush()
        train_now, _ = split_trainable(job.params, run.roles)
        job.checkpointer.save(step, train_now, job.opt_state, {
            "step": step, "total_steps": total_steps, "data": job.iterator.state(),
            "seed": config.seed, "identity": job.identity,
            **readback.totals(time.time() - started, eval_before)._asdict()})
        last_save = time.time()
        readback.restart_clock()

    try:
        for step in range(job.start_step, total_steps):
            micro = _stack_micro([next(job.iterator) for _ in range(config.grad_accum)])
            tokens = int(micro["attention_mask"].sum())
            batch = {k: _to_devices(v, sharding) for k, v in micro.items()}
            batch["step"] = np.int32(step)
            job.params, job.opt_state, metrics = step_fn(job.params, job.opt_state, batch)
            readback.pending.append((step, metrics, tokens))
            # Read back the previous step while this one runs.
            readback.drain(keep=1)
            if step + 1 < total_steps and _save_due(config, step + 1, last_save):
                save(step + 1)
        if job.start_step < total_steps:
            save(total_steps)
        job.checkpointer.wait()
    finally:
        progress.close()
        log.close()
        job.checkpointer.close()
    return readback.totals(time.time() - started, eval_before)


def _finish(job: _Job, totals: "_RunTotals", eval_before: dict | None,
            eval_after: dict | None) -> RunSummary:
    """The summary, the exports (merged folder, adapter) and ``summary.json``."""
    config, run = job.config, job.run
    trainable, _ = split_trainable(job.params, run.roles)
    summary = RunSummary(
        mode=config.mode, model=run.source.name, steps=job.total_steps, tokens=totals.tokens,
        seconds=round(totals.seconds, 2), trainable_params=count_params(trainable),
        total_params=count_params(job.params), final_loss=totals.final_loss,
        skipped_steps=totals.skipped, eval_before=eval_before, eval_after=eval_after,
        run_dir=str(job.run_dir))
    if config.export and jax.process_index() == 0:
        from molf_jax.train.export import RunArtifacts, export_artifacts

        artifacts = RunArtifacts(config=config, model_config=run.source.config,
                                 params=job.params, lora=run.lora, roles=run.roles,
                                 mode=config.mode, source_dir=run.source.hf_dir,
                                 tokenizer=run.tokenizer, total_steps=job.total_steps)
        if find_allocator_state(job.opt_state) is not None:
            artifacts.params = apply_rank_pattern(job.params, job.opt_state)
            artifacts.rank_pattern = rank_pattern(job.opt_state)
        written, note = export_artifacts(artifacts, job.run_dir)
        summary.merged_dir = str(written["merged"])
        summary.adapter_dir = str(written["adapter"]) if "adapter" in written else None
    if job.plan.primary:
        write_replacing(job.run_dir.summary, json.dumps(dataclasses.asdict(summary), indent=1))
    _print_summary(summary)
    return summary


class _RunTotals(NamedTuple):
    """What a run has done so far. Saved in every checkpoint, so that the summary of a resumed
    run covers the whole run, not only its last part."""

    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0
    final_loss: float | None = None
    eval_before: dict[str, float] | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> "_RunTotals":
        return cls(**{name: meta[name] for name in cls._fields if name in meta})


class _Readback:
    """Reads finished steps back from the device one step behind the dispatch, and logs them.

    ``pending`` holds ``(step, device metrics, tokens)`` of dispatched steps; ``drain(keep=1)``
    after each dispatch logs all but the step in flight, ``drain(keep=0)`` logs everything
    (before a checkpoint).
    """

    def __init__(self, config: TrainConfig, log: RunLog, progress, schedules, total_steps: int,
                 before: _RunTotals):
        self.pending: list[tuple[int, Any, int]] = []
        self._config, self._log, self._progress = config, log, progress
        self._schedules, self._total_steps = schedules, total_steps
        self._before = before
        self._tokens, self._skipped, self._final_loss = 0, before.skipped, before.final_loss
        self._interval: list[dict] = []
        self._step_times: list[float] = []
        self._last_time = time.time()
        self._last_step = 0
        self._nonfinite_run = 0
        self._eta_said = False

    def drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            self._record(*self.pending.pop(0))

    def flush_interval(self) -> None:
        """Writes the metrics row of a logging interval cut short (by a checkpoint)."""
        if self._interval:
            self._log.metrics(_interval_row(self._last_step, self._interval, self._schedules,
                                            self._skipped))
            self._interval = []

    def restart_clock(self) -> None:
        self._last_time = time.time()

    def totals(self, seconds: float, eval_before: dict | None) -> _RunTotals:
        b = self._before
        return _RunTotals(tokens=b.tokens + self._tokens, seconds=b.seconds + seconds,
                          skipped=self._skipped, final_loss=self._final_loss,
                          eval_before=eval_before)

    def _record(self, step: int, metrics: Any, tokens: int) -> None:
        config = self._config
        host = jax.device_get(metrics)
        now = time.time()
        self._step_times.append(now - self._last_time)
        self._last_time = now
        self._tokens += tokens
        self._last_step = step + 1
        if bool(host["skipped"]):
            self._skipped += 1
            self._nonfinite_run += 1
            self._progress.write(f"step {step + 1}: non-finite loss or gradient; update "
                                 f"skipped ({self._nonfinite_run} in a row)", file=sys.stderr)
            if self._nonfinite_run >= config.max_nonfinite:
                raise NonFiniteLossError(
                    f"{self._nonfinite_run} non-finite steps in a row (--max-nonfinite "
                    f"{config.max_nonfinite}); stopping at step {step + 1}")
        else:
            self._nonfinite_run = 0
            self._final_loss = float(host["loss"])
        host["tokens_per_s"] = tokens / max(self._step_times[-1], 1e-9)
        self._interval.append(host)
        if "route_winners" in host and config.routing_log_every and \
                (step + 1) % config.routing_log_every == 0:
            self._log.routing(step + 1, host["route_winners"], host["route_scores"])
        if "adalora_ranks" in host and config.routing_log_every and \
                (step + 1) % config.routing_log_every == 0:
            self._log.ranks(step + 1, host["adalora_ranks"], host["adalora_budget"])
        if (step + 1) % config.log_every == 0 or step == self._total_steps - 1:
            self.flush_interval()
        loss = self._final_loss
        self._progress.update(1)
        self._progress.set_postfix_str(f"loss {loss if loss is None else round(loss, 4)} | "
                                       f"{host['tokens_per_s']:,.0f} tok/s")
        if not self._eta_said and len(self._step_times) == 3:
            left = self._total_steps - step - 1
            eta = statistics.median(self._step_times[1:]) * left
            # tqdm.write keeps the bar whole below the line.
            self._progress.write(f"after compilation, about {_duration(eta)} of training left",
                                 file=sys.stderr)
            self._eta_said = True


def _save_due(config: TrainConfig, step: int, last_save: float) -> bool:
    """Whether to checkpoint after ``step``: every ``save_every`` steps and every
    ``save_every_minutes`` minutes (process 0's clock decides for all hosts)."""
    due = bool(config.save_every) and step % config.save_every == 0
    if config.save_every_minutes:
        due = due or time.time() - last_save >= 60 * config.save_every_minutes
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            due = bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
    return due


def _interval_row(step: int, interval: list[dict], schedules, skipped_total: int) -> dict:
    finite = [m for m in interval if not bool(m["skipped"])]
    row: dict[str, Any] = {
        "step": step,
        "loss": float(np.mean([m["loss"] for m in finite])) if finite else None,
        "lr_fft": float(schedules["fft"](step - 1)),
        "lr_lora": float(schedules["lora"](step - 1)),
        "grad_norm": float(np.mean([m["grad_norm"] for m in finite])) if finite else None,
        "tokens_per_s": float(np.mean([m["tokens_per_s"] for m in interval])),
        "skipped": skipped_total,
    }
    if interval and "adalora_budget" in interval[-1]:
        row["adalora_budget"] = int(interval[-1]["adalora_budget"])
        penalties = [m["regularizer"] for m in finite if "regularizer" in m]
        if penalties:
            row["orth_reg"] = float(np.mean(penalties))
    if interval and "fft_fraction" in interval[-1]:
        row["fft_fraction"] = float(np.mean([m["fft_fraction"] for m in interval]))
    if interval and "expert_fraction" in interval[-1]:
        row["expert_fraction"] = np.mean([m["expert_fraction"] for m in interval],
                                         axis=0).tolist()
    return row


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _fmt(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items()) or "(nothing)"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _print_summary(s: RunSummary) -> None:
    lines = [
        "",
        f"done: {s.mode} on {s.model}, {s.steps} steps, {s.tokens:,} tokens in "
        f"{_duration(s.seconds)}; final loss {s.final_loss}; skipped steps {s.skipped_steps}",
        f"trainable parameters: {s.trainable_params:,} of {s.total_params:,}",
    ]
    if s.eval_before is not None and s.eval_after is not None:
        for name in s.eval_after:
            before = s.eval_before.get(name, float("nan"))
            after = s.eval_after[name]
            lines.append(f"  {name}: {before:.4f} -> {after:.4f} ({after - before:+.4f})")
    lines.append(f"run directory: {s.run_dir}")
    if s.merged_dir:
        lines.append(f"merged HF checkpoint: {s.merged_dir}")
    if s.adapter_dir:
        lines.append(f"LoRA adapter: {s.adapter_dir}")
    print("\n".join(lines), flush=True)
