"""A run resolved once: every setting a `TrainConfig` leaves open is decided here, and the rest of
the run reads the result.

`resolve_config` fills the settings left None (the platform's numerics, the mode's recipe, the
data protocol and its length cap); `plan_run` adds what the processes and devices decide (the
process policy and the mesh). Nothing downstream fills a default again (docs/design.md,
"Resolve once").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from molf_jax.data import PROTOCOL_SETTINGS
from molf_jax.train.config import ConfigError, TrainConfig
from molf_jax.train.mesh import batch_divisor, initialize_distributed, make_mesh
from molf_jax.train.modes import Mode, mode_of
from molf_jax.train.platform import describe_numerics, with_platform_defaults

__all__ = ["RunPlan", "plan_run", "resolve_config", "unresolved_fields"]

# Fields whose None is a decision, not a default waiting to be filled: `steps` None trains
# for `epochs`, `max_length` None is "no cap" (the authors' protocol), and each mode leaves
# the rank field of the other kind of adapter empty (adalora's rank is `init_r`).
_NONE_MEANS_SOMETHING = ("steps", "max_length")


def resolve_config(config: TrainConfig, platform: str | None = None) -> TrainConfig:
    """``config`` with every setting it leaves to the platform, the mode or the data filled in.

    Args:
      config: the run's configuration, as given.
      platform: whose numerics to take (default: ``jax.default_backend()``).

    Returns:
      The same run with the numerics and kernels (`with_platform_defaults`), the mode's ranks,
      alphas, LoRA rate and top-k (`molf_jax.train.modes.Mode.recipe`), the data protocol and
      the length cap written out. Resolving a resolved config changes nothing.

    Example:
      >>> resolved = resolve_config(TrainConfig(mode="molfe"), "cpu")
      >>> resolved.lora_ranks, resolved.top_k, resolved.param_dtype, resolved.protocol
      ((32, 128), 2, 'float32', 'molf_jax')
      >>> resolve_config(resolved, "cpu") == resolved
      True
    """
    config = with_platform_defaults(config, platform)
    protocol = config.data_protocol
    max_length = config.max_length
    if max_length is None:
        max_length = PROTOCOL_SETTINGS[protocol].max_length
    return config.replace(protocol=protocol, max_length=max_length,
                          **mode_of(config).resolved_fields(config))


def unresolved_fields(config: TrainConfig) -> list[str]:
    """The fields of ``config`` still None that the run would have to fill in (none once
    `resolve_config` ran)."""
    other_rank = "lora_ranks" if mode_of(config).adapter == "adalora" else "init_r"
    return [f.name for f in dataclasses.fields(config) if getattr(config, f.name) is None
            and f.name not in (*_NONE_MEANS_SOMETHING, other_rank)]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A training run with every decision taken; what `molf_jax.train.assemble_run` and the
    loop read.

    Attributes:
      config: the resolved `TrainConfig` (`resolve_config`), with the process policy applied.
      mode: its `molf_jax.train.modes.Mode`.
      mesh: the device mesh its arrays live on.
      primary: this process writes the run's files (every process saves its shards).
      notes: what the plan decided that the user should hear (numerics, process policy).
    """

    config: TrainConfig
    mode: Mode
    mesh: Any
    primary: bool
    notes: tuple[str, ...]


def plan_run(config: TrainConfig, *, platform: str | None = None,
             training: bool = True) -> RunPlan:
    """Resolves ``config`` (`resolve_config`), starts multi-process JAX where the environment
    asks for it, applies the process policy and builds the mesh.

    With several processes, evaluation and export are left to one process afterwards: both run
    on one process's arrays, and the checkpoint restores there on any topology. With
    ``training=False`` (rebuilding a finished run on one process to export it) the plan only
    resolves the config and builds the mesh.

    Example:
      >>> plan = plan_run(TrainConfig(mode="lora", mesh="fsdp=1"), platform="cpu")
      >>> plan.mode.name, plan.config.lora_ranks, dict(plan.mesh.shape)
      ('lora', (32,), {'data': 1, 'fsdp': 1, 'tensor': 1})
    """
    if training:
        initialize_distributed()
    config = resolve_config(config, platform)
    notes = [describe_numerics(config, platform)]
    if not training:
        return RunPlan(config=config, mode=mode_of(config), mesh=make_mesh(config.mesh),
                       primary=jax.process_index() == 0, notes=tuple(notes))
    if jax.process_count() > 1 and (config.eval_before_after or config.export):
        notes.append(f"{jax.process_count()} processes: evaluation and export are left to one "
                     f"process afterwards: molf-jax export {config.out_dir}; molf-jax eval "
                     f"--model {config.out_dir}/merged")
        config = config.replace(eval_before_after=False, export=False)
    mesh = make_mesh(config.mesh)
    rows_divisor = batch_divisor(mesh)
    if config.batch_size % rows_divisor:
        raise ConfigError(f"--batch-size {config.batch_size} must divide over the mesh's "
                          f"data x fsdp = {rows_divisor} devices")
    return RunPlan(config=config, mode=mode_of(config), mesh=mesh,
                   primary=jax.process_index() == 0, notes=tuple(notes))
