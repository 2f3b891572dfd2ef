"""The training configuration: one dataclass, the paper's hyperparameter names, checked early."""

from __future__ import annotations

import dataclasses
from typing import Any

MODES = ("fft", "lora", "molf", "molfe", "molf_gate")
# Modes whose optimizer routes between experts (they log routing), and those with an FFT expert.
ROUTED_MODES = ("molf", "molfe", "molf_gate")
FFT_EXPERT_MODES = ("molf", "molf_gate")
SCHEDULES = ("cosine", "linear", "constant")
SCORES = ("epd", "pfn")
REMAT = ("none", "full", "dots_saveable")
DTYPES = ("float32", "bfloat16")

# One alpha for every rank: with rsLoRA the scale 16 / sqrt(r) keeps a rank-128 expert's update
# size close to a rank-16 one's (Kalajdzievski 2023), which routing between ranks needs.
DEFAULT_ALPHA = 16.0
# Per mode, the LoRA ranks used when none are given (DESIGN.md section 1).
DEFAULT_RANKS = {"fft": (), "lora": (32,), "molf": (128,), "molfe": (16, 128),
                 "molf_gate": (128,)}


class ConfigError(ValueError):
    """A training configuration that cannot run; the message says which setting and why."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs to know.

    Attributes:
      mode: 'fft', 'lora', 'molf' (FFT expert + LoRA experts), 'molfe' (frozen base, LoRA
        experts of several ranks) or 'molf_gate' (molf's experts, routed by `molf_gate` chained
        before AdamW: the approximate gradient-gating form, DESIGN.md section 2).
      model: an HF folder, a preset name for a random-init model (e.g. 'qwen2.5-0.5b'), or
        'default' for the embedded Gemma 3 270M.
      task: 'sql', 'med' or 'fact'; source: 'offline', a hub name or a local file.
      task_size: number of records the offline generator makes.
      lora_ranks / lora_alpha (one alpha for all ranks, or one per rank; default 16, so with
        rsLoRA s = 16 / sqrt(r)) / lora_dropout / rslora / lora_targets: the LoRA experts.
      fft_lr, lora_lr, fft_weight_decay, lora_weight_decay: the paper's two groups.
      top_k, score: routing (molf, molfe).
      train_embeddings_norms: molfe only; also train embeddings, norms and non-target params
        (the authors' default). Off by default: MoLF-Efficient's point is the frozen base.
      batch_size, grad_accum: micro-batch rows and micro-batches per optimizer step.
      epochs or steps: run length (steps wins when both are given).
      warmup_ratio, schedule: learning-rate shape shared by both groups.
      max_length: longest example in tokens; overflow: 'drop' or 'truncate_left'.
      param_dtype, state_dtype, compute_dtype, remat, scan_layers, loss_chunk: numerics/memory.
      merged_lora: in modes whose base kernels train (molf, molf_gate), run each target linear
        as one matmul with the merged kernel and take the experts' gradients from the kernel's
        (same gradients, fewer FLOPs; ``LoraSpec.merged``). Inactive while LoRA dropout is on.
      mesh: 'data=1,fsdp=-1,tensor=1' style axis sizes (-1: all remaining devices).
      out_dir, save_every, keep_checkpoints, log_every, routing_log_every, tensorboard, resume.
      max_nonfinite: stop after this many non-finite losses in a row (each one skips its step).
      eval_before_after / eval_limit: evaluate the task metric before and after training.
    """

    mode: str = "molf"
    model: str = "default"
    task: str = "fact"
    source: str = "offline"
    task_size: int = 96
    seed: int = 0

    lora_ranks: tuple[int, ...] | None = None
    lora_alpha: tuple[float, ...] | None = None
    lora_dropout: float = 0.05
    rslora: bool = True
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj")

    fft_lr: float = 5e-5
    lora_lr: float = 5e-4
    fft_weight_decay: float = 0.1
    lora_weight_decay: float = 0.01
    top_k: int = 1
    score: str = "epd"
    train_embeddings_norms: bool = False

    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 2.0
    steps: int | None = None
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    max_length: int = 256
    overflow: str = "drop"

    param_dtype: str = "float32"
    state_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    loss_chunk: int = 1024
    merged_lora: bool = True

    mesh: str = "data=1,fsdp=-1,tensor=1"
    out_dir: str = "runs/molf"
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    routing_log_every: int = 1
    tensorboard: bool = False
    resume: bool = False
    max_nonfinite: int = 3
    eval_before_after: bool = True
    eval_limit: int = 64
    export: bool = True

    def __post_init__(self):
        _check(self)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.lora_ranks) if self.lora_ranks is not None else DEFAULT_RANKS[self.mode]

    @property
    def alphas(self) -> tuple[float, ...]:
        if self.lora_alpha is None:
            return tuple(DEFAULT_ALPHA for _ in self.ranks)
        if len(self.lora_alpha) == 1:
            return tuple(float(self.lora_alpha[0]) for _ in self.ranks)
        return tuple(float(a) for a in self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _check(c: TrainConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(c.mode in MODES, f"unknown mode {c.mode!r}; choose one of {', '.join(MODES)}")
    need(c.schedule in SCHEDULES, f"unknown schedule {c.schedule!r}; choose {SCHEDULES}")
    need(c.score in SCORES, f"unknown score {c.score!r}; choose {SCORES}")
    need(c.remat in REMAT, f"unknown remat policy {c.remat!r}; choose {REMAT}")
    for name in ("param_dtype", "state_dtype", "compute_dtype"):
        need(getattr(c, name) in DTYPES, f"{name} must be one of {DTYPES}")
    ranks = c.ranks
    need(all(isinstance(r, int) and r > 0 for r in ranks),
         f"LoRA ranks must be positive integers, got {list(ranks)}")
    if c.mode == "lora":
        need(len(ranks) == 1, f"mode 'lora' takes one rank, got {list(ranks)}")
    if c.mode in FFT_EXPERT_MODES:
        need(len(ranks) >= 1, f"mode {c.mode!r} needs at least one LoRA rank")
    if c.mode == "molfe":
        need(len(ranks) >= 2, f"mode 'molfe' routes between LoRA experts: give two or more "
                              f"ranks, got {list(ranks)}")
    if c.lora_alpha is not None:
        need(len(c.lora_alpha) in (1, len(ranks)),
             f"give one LoRA alpha or one per rank ({len(ranks)}), got {list(c.lora_alpha)}")
    experts = len(ranks) + (1 if c.mode in FFT_EXPERT_MODES else 0)
    if c.mode in ROUTED_MODES:
        need(isinstance(c.top_k, int) and 1 <= c.top_k <= experts,
             f"top-k must be between 1 and the number of experts per module ({experts}), "
             f"got {c.top_k}")
    for name in ("fft_lr", "lora_lr", "fft_weight_decay", "lora_weight_decay"):
        need(getattr(c, name) >= 0, f"{name.replace('_', '-')} must be >= 0, got "
                                    f"{getattr(c, name)}")
    need(0 <= c.lora_dropout < 1, f"lora-dropout must be in [0, 1), got {c.lora_dropout}")
    need(0 <= c.warmup_ratio < 1, f"warmup-ratio must be in [0, 1), got {c.warmup_ratio}")
    need(c.batch_size >= 1 and c.grad_accum >= 1, "batch-size and grad-accum must be >= 1")
    need(c.steps is None or c.steps >= 1, f"steps must be >= 1, got {c.steps}")
    need(c.steps is not None or c.epochs > 0, f"epochs must be > 0, got {c.epochs}")
    need(c.max_length >= 8, f"max-length must be at least 8, got {c.max_length}")
    need(c.overflow in ("drop", "truncate_left"), "overflow must be 'drop' or 'truncate_left'")
    need(c.task in ("sql", "med", "fact"), f"unknown task {c.task!r}; choose sql, med or fact")
    need(c.task_size >= 1, f"task-size must be >= 1, got {c.task_size}")
    need(c.max_nonfinite >= 1, "max-nonfinite must be >= 1")
    need(c.loss_chunk >= 1, "loss-chunk must be >= 1")
    need(c.save_every >= 0 and c.log_every >= 1 and c.routing_log_every >= 0,
         "save-every >= 0, log-every >= 1, routing-log-every >= 0")
