"""After training: the merged HF checkpoint, the PEFT adapter, and reloading a finished run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from molf_jax.adalora import (AdaLoraSpec, adalora_triplets, apply_rank_pattern,
                              merge_adalora, rank_pattern)
from molf_jax.checkpoints import save_hf
from molf_jax.checkpoints.folders import EXPORT_MARKER, FolderError, check_destination
from molf_jax.checkpoints.peft import save_peft_adapter
from molf_jax.checkpoints.peft_adalora import save_peft_adalora_adapter
from molf_jax.lora import LoraSpec, lora_paths, merge_lora
from molf_jax.paths import as_path, is_remote
from molf_jax.run_dir import RunDir
from molf_jax.param_roles import LORA, split_trainable
from molf_jax.train.checkpoint import RunCheckpointer
from molf_jax.train.config import SCORES, TrainConfig
from molf_jax.train.modes import adalora_schedule, mode_of
from molf_jax.train.plan import plan_run
from molf_jax.train.setup import assemble_run, model_identity
from molf_jax.trees import join_trees, tree_paths

EXPORT_DTYPES = ("bfloat16", "float32")

__all__ = ["RunArtifacts", "adapter_refusal", "export_artifacts", "load_run", "merge_adapters"]


@dataclasses.dataclass
class RunArtifacts:
    """A finished run, rebuilt from its directory (see `load_run`).

    ``total_steps`` and, for adalora, ``rank_pattern`` (``{module: kept bool [.., init_r]}``;
    the params already have the pruned singular values at 0) come from the run's end;
    ``roles`` holds each leaf's `molf_jax.param_roles.ParamRole` (`molf_jax.train.mode_roles`).
    """

    config: TrainConfig
    model_config: Any
    params: Any
    lora: LoraSpec | AdaLoraSpec | None
    roles: Any
    mode: str
    source_dir: Path | None
    tokenizer: Any
    total_steps: int | None = None
    rank_pattern: dict | None = None


def merge_adapters(params: Any, spec: LoraSpec | AdaLoraSpec | None) -> Any:
    """``params`` with its LoRA experts or AdaLoRA triplets folded into the kernels.

    Example:
      >>> run = load_run("runs/adalora")                              # doctest: +SKIP
      >>> params = merge_adapters(run.params, run.lora)               # doctest: +SKIP
    """
    if isinstance(spec, AdaLoraSpec):
        return merge_adalora(params, spec)
    return merge_lora(params, spec) if spec is not None else params


def export_artifacts(run: Any, run_dir: str | os.PathLike, *,
                     merged_dir: str | os.PathLike | None = None,
                     adapter_dir: str | os.PathLike | None = None,
                     dtype: str | None = None,
                     overwrite: bool = False) -> tuple[dict[str, Path], str | None]:
    """Writes the merged HF folder and, where the run allows it, the PEFT adapter.

    Args:
      run: a ``molf_jax.train.RunArtifacts`` (``load_run``): config, model_config, params,
        lora, roles, mode, source_dir, tokenizer.
      run_dir: the run directory (default home of ``merged/`` and ``adapter/``).
      merged_dir, adapter_dir: destinations. An explicit ``adapter_dir`` on a run that cannot
        have an adapter is an error; by default such a run just gets none.
      dtype: ``"bfloat16"``, ``"float32"`` or None (the parameters' own dtype).
      overwrite: replace destinations holding files molf_jax did not write. The run's base
        model, the embedded model's cache and run directories are refused regardless
        (`molf_jax.checkpoints.folders`).

    Returns:
      ``({"merged": path, "adapter": path}, note)``: the folders written, and why there is no
      adapter (None when there is one).

    Example:
      >>> export_artifacts(load_run("runs/lora"), "runs/lora")   # doctest: +SKIP
      ({'merged': PosixPath('runs/lora/merged'), 'adapter': PosixPath('runs/lora/adapter')}, None)
    """
    run_dir = RunDir(run_dir)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    storage = None if dtype is None else jnp.dtype(dtype)
    refusal = adapter_refusal(run)
    if refusal and adapter_dir is not None:
        raise ValueError(f"cannot write a PEFT adapter for {run_dir}: {refusal}")

    merged_dir = as_path(merged_dir) if merged_dir is not None else run_dir.merged
    adapter_dir = as_path(adapter_dir) if adapter_dir is not None else run_dir.adapter
    # Both destinations are checked before either is written.
    safety = dict(overwrite=overwrite, protected=(run.source_dir,))
    _check_destination(merged_dir, "--merged", safety)
    if refusal is None:
        _check_destination(adapter_dir, "--adapter", safety)
    params = jax.device_get(run.params)
    size = sum(x.size * (storage if storage is not None else x.dtype).itemsize
               for x, role in zip(jax.tree.leaves(params), jax.tree.leaves(run.roles))
               if role.group != LORA)
    # A large model takes minutes to merge and write: say so before, not only after.
    print(f"export: writing the merged HF folder {merged_dir} (about {size / 2**30:.1f} GiB)",
          file=sys.stderr, flush=True)
    written = {}
    with _written_to(merged_dir) as folder:
        save_hf(folder, params, run.model_config, lora=run.lora, source_dir=run.source_dir,
                tokenizer=None if run.source_dir is not None else run.tokenizer, dtype=storage,
                **safety)
    written["merged"] = merged_dir
    base = str(run.source_dir) if run.source_dir is not None else str(run.config.model)
    if refusal is not None:
        return written, refusal
    with _written_to(adapter_dir) as folder:
        if isinstance(run.lora, AdaLoraSpec):
            save_peft_adalora_adapter(
                folder, params, run.model_config, run.lora,
                adalora_schedule(run.config, run.total_steps), run.rank_pattern,
                base_model_name_or_path=base, orth_reg_weight=run.config.orth_reg_weight,
                dtype=storage, **safety)
        else:
            save_peft_adapter(folder, params, run.model_config, run.lora,
                              base_model_name_or_path=base, dtype=storage, **safety)
    written["adapter"] = adapter_dir
    return written, refusal


def _check_destination(folder, flag: str, safety: dict) -> None:
    """`check_destination`, for object storage too (same rules: never over a run or a folder
    of files molf_jax did not write, unless ``overwrite``)."""
    if not is_remote(folder):
        check_destination(folder, flag=flag, **safety)
        return
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if RunDir(folder).config.name in names:
        raise FolderError(f"{flag} {folder}: that is a training run's directory; writing there "
                          "would break it (even with --overwrite); choose another folder")
    if names and EXPORT_MARKER not in names and not safety["overwrite"]:
        raise FolderError(f"{flag} {folder}: holds files molf_jax did not write "
                          f"({', '.join(names[:4])}); choose another folder, or pass "
                          "--overwrite to replace it")


@contextlib.contextmanager
def _written_to(folder) -> Iterator[Path]:
    """Yields the local folder an exporter writes. For object storage (whose files safetensors
    cannot write) that is a local staging folder, copied to ``folder`` once complete, after the
    folder's old files are removed."""
    if not is_remote(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=".molf_jax-export-") as staging:
        local = Path(staging) / folder.name
        yield local
        if folder.exists():
            folder.rmtree()
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            target = folder / file.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(file, "rb") as source, target.open("wb") as copy:
                shutil.copyfileobj(source, copy, 64 * 2**20)


def adapter_refusal(run: Any) -> str | None:
    """Why ``run`` cannot be exported as a LoRA adapter, or None when it can.

    An adapter carries only the LoRA factors, so every other leaf must be the base model's.
    ``load_run`` rebuilds frozen leaves from the base, so the leaves the run's roles mark
    trainable are exactly the ones that may have moved.
    """
    mode = mode_of(run.mode)
    if mode.adapter == "none":
        return "an fft run has no LoRA experts; use the merged folder"
    if isinstance(run.lora, AdaLoraSpec):
        if next(adalora_triplets(run.params), None) is None or run.rank_pattern is None:
            return "the adalora run's parameters hold no AdaLoRA triplets and rank pattern"
        return None
    if run.lora is None or not lora_paths(run.params):
        return f"the {run.mode} run's parameters hold no LoRA leaves"
    roles = jax.tree.leaves(run.roles)  # ParamRole leaves, in the order of tree_paths
    moved = [p for p, role in zip(tree_paths(run.params), roles)
             if role.trainable and role.group != LORA]
    return mode.adapter_refusal(moved) if moved else None


def load_run(run_dir, *, score: str | None = None) -> RunArtifacts:
    """Rebuilds a run's full parameters (base + trained leaves) from its latest checkpoint.

    A run directory is data: the routing score it records is used only when it is one of
    molf_jax's own. A run trained with a custom score (``package.module:name``) names code,
    which is imported only when the caller passes it again as ``score``.

    Args:
      run_dir: a directory written by ``molf-jax train``.
      score: the run's custom routing score (``--score`` of ``molf-jax export``).

    Raises:
      ValueError: ``run_config.json`` is not a run's configuration, or records a custom score
        that ``score`` does not supply.

    Example:
      >>> run = load_run("runs/molf")                                 # doctest: +SKIP
      >>> run.params["layers"]["0"]["self_attn"]["q_proj"]["lora_1"]["a"].shape  # doctest: +SKIP
    """
    run_dir = RunDir(run_dir).require()
    plan = plan_run(_recorded_config(run_dir, score).replace(mesh="data=1,fsdp=-1,tensor=1"),
                    training=False)
    config = plan.config
    run = assemble_run(plan)
    trainable, frozen = split_trainable(run.params, run.roles)
    checkpointer = RunCheckpointer(run_dir, async_save=False)
    try:
        # AdaLoRA's schedule needs the run's step count: --steps, or the last checkpoint's.
        total_steps = config.steps or checkpointer.latest_step() or 1
        optimizer, _ = plan.mode.optimizer(config, total_steps=total_steps, roles=run.roles)
        opt_state = jax.eval_shape(optimizer.init, trainable)
        opt_state = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), opt_state)
        trainable, opt_state, _ = checkpointer.restore(
            trainable, opt_state, identity=model_identity(config, run.source, run.params),
            say=lambda message: print(message, file=sys.stderr, flush=True))
    finally:
        checkpointer.close()
    params = join_trees(trainable, frozen)
    pattern = None
    if isinstance(run.lora, AdaLoraSpec):
        params, pattern = apply_rank_pattern(params, opt_state), rank_pattern(opt_state)
    return RunArtifacts(config=config, model_config=run.source.config, params=params,
                        lora=run.lora, roles=run.roles, mode=config.mode,
                        source_dir=run.source.hf_dir, tokenizer=run.tokenizer,
                        total_steps=total_steps, rank_pattern=pattern)


def _recorded_config(run_dir: RunDir, score: str | None) -> TrainConfig:
    """The run's `TrainConfig` from ``run_config.json``, every fault named with the file."""
    where = run_dir.config
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not a run configuration (a JSON object)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
    recorded = raw.get("score", "epd")
    if recorded not in SCORES and score is None:
        raise ValueError(f"{where}: the run was trained with the custom routing score "
                         f"{recorded!r}; molf_jax imports no code a run directory names: pass "
                         f"--score {recorded} (score={recorded!r}) to load it with that code")
    if score is not None:
        raw["score"] = score
    for key in ("lora_ranks", "lora_alpha", "lora_targets"):
        if isinstance(raw.get(key), list):
            raw[key] = tuple(raw[key])
    try:
        return TrainConfig(**raw)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
