"""Tiny HF folders for training tests: random Qwen2 / Gemma 3 shapes with a byte-level tokenizer."""

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from molf_jax import models
from molf_jax.checkpoints import save_hf
from molf_jax.data import byte_level_tokenizer
from molf_jax.run_dir import RunDir


def tiny_hf_folder(path: Path, family: str = "qwen2", seed: int = 0) -> Path:
    """Writes a 2-layer model whose vocabulary covers the byte-level tokenizer."""
    tokenizer = byte_level_tokenizer()
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    if family == "qwen2":
        config = models.preset("qwen2.5-0.5b", **common)
    else:
        config = models.preset("gemma3-270m", **common, sliding_window=16,
                               layer_types=("sliding_attention", "full_attention"))
    model = models.build_model(config)
    params = models.init_params(model, jax.random.key(seed))
    save_hf(path, jax.device_get(params), config, tokenizer=tokenizer)
    return path


def tiny_config(model_dir, out_dir, **overrides):
    """A TrainConfig sized for tests: one device, a few steps, no evaluation or export."""
    from molf_jax.train import TrainConfig

    base = dict(model=str(model_dir), out_dir=str(out_dir), task="fact", task_size=8,
                batch_size=4, steps=6, max_length=96, mesh="fsdp=1", fft_lr=3e-3, lora_lr=3e-2,
                warmup_ratio=0.0, schedule="constant", lora_dropout=0.0,
                eval_before_after=False, export=False)
    base.update(overrides)
    if base.get("mode") in ("lora", "molf", "molf_gate") and "lora_ranks" not in overrides:
        base["lora_ranks"] = (4,)
    if base.get("mode") == "molfe" and "lora_ranks" not in overrides:
        base["lora_ranks"] = (2, 8)
    return TrainConfig(**base)


def tiny_step_parts(config, *, nonzero_lora_b: bool = True, max_grad_norm: float | None = 1.0):
    """What `make_train_step` needs for ``config`` on one device: (model, params, roles,
    optimizer). LoRA ``b`` leaves get small random values (as after some training) so that
    every expert's ``a`` has a gradient too."""
    import jax.numpy as jnp
    import numpy as np

    from molf_jax.train import assemble_run, build_optimizer, plan_run

    run = assemble_run(plan_run(config.replace(mesh="fsdp=1")),
                       keys=tuple(jax.random.split(jax.random.key(0))))
    params = run.params
    if nonzero_lora_b:
        rng = np.random.default_rng(1)
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype)
            if getattr(p[-1], "key", None) == "b" else x, params)
    optimizer, _ = build_optimizer(run.config, total_steps=8, roles=run.roles,
                                   max_grad_norm=max_grad_norm)
    return run.model, params, run.roles, optimizer


def final_params(run_dir):
    """(step, trainable params) of a run directory's latest checkpoint, each array whole on
    this process's first device, whatever topology saved it (several processes, another mesh).
    """
    manager = ocp.CheckpointManager(RunDir(run_dir).checkpoints, item_handlers={
        "params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler()})
    try:
        step = manager.latest_step()
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step)["params"])
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
        return step, restored["params"]
    finally:
        manager.close()
