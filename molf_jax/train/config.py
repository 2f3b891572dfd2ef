"""The training configuration: one dataclass, the paper's hyperparameter names, checked early."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from molf_jax.data import PROTOCOL_SETTINGS, PROTOCOLS, TASKS, resolve_protocol
from molf_jax.models import PROJECTIONS
from molf_jax.options import choices_of, option
from molf_jax.routing import resolve_score
from molf_jax.train.errors import ConfigError
from molf_jax.train.modes import (ADALORA_ALPHA, FFT_EXPERT_MODES, MODES, ROUTED_ALPHA,
                                  ROUTED_MODES, Recipe, mode_of)

__all__ = ["TrainConfig", "ConfigError", "MODES", "ROUTED_MODES", "FFT_EXPERT_MODES", "SCHEDULES",
           "SCORES", "REMAT", "DTYPES", "OVERFLOWS", "ATTENTION"]

SCHEDULES = ("cosine", "linear", "constant")
SCORES = ("epd", "pfn")
REMAT = ("none", "full", "dots_saveable")
DTYPES = ("float32", "bfloat16")
OVERFLOWS = ("drop", "truncate_left")
ATTENTION = ("xla", "cudnn")

# The step counter is an int32 on the devices; epochs are bounded so that their step count is.
MAX_STEPS = 2**31 - 1
MAX_EPOCHS = 1e6



@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs to know; ``molf-jax train`` has one flag per field.

    Each field's help (also ``molf-jax train --help``) says what it sets. The paper's two
    parameter groups are ``fft_*`` (the FFT expert and the non-routed leaves) and ``lora_*``.
    Settings left None (the default) are filled in once, when the run is planned
    (`molf_jax.train.resolve_config`): numerics and kernels by the platform, the LoRA ranks,
    alphas, rate and top-k by the mode's recipe (`molf_jax.train.modes`), the protocol and the
    length cap by the data source.

    Example:
      >>> TrainConfig(mode="molfe").ranks, TrainConfig(mode="molfe").routing_top_k
      ((32, 128), 2)
    """

    mode: str = option("molf", "fft, lora, molf (FFT expert + LoRA experts), molfe (frozen "
                       "base, LoRA experts of several ranks), molf_gate (molf's experts gated "
                       "before AdamW: the approximate form, docs/design.md section 2) or adalora "
                       "(frozen base, AdaLoRA triplets pruned by peft's rank allocator)",
                       choices=tuple(MODES), group="run")
    model: str = option("default", "'default' (embedded Gemma 3 270M), an HF folder, or a "
                        "preset name for a random-init model (e.g. qwen2.5-1.5b; tiny-qwen2 or "
                        "tiny-gemma3 for a smoke run in seconds)")
    task: str = option("fact", "the task to train on", choices=TASKS)
    source: str = option("offline", "'offline', a hub dataset name, or a local "
                         "json/jsonl/parquet/folder")
    protocol: str | None = option(
        None, "data preparation and scoring: 'authors' (their code's prompts, EOS, BOS "
        "handling, no length cap, random batches and metrics, to compare with the paper) or "
        "'molf_jax' (ours)", default_text="molf_jax; authors only when asked for")
    # 48 fact edits plus their 48 anchors: 24 steps of 8 over 2 epochs, the CPU main job.
    task_size: int = option(48, "records the offline generator makes (offline fact: edits, "
                            "each trained with one anchor)")
    seed: int = option(0, "seed of parameters, data order and dropout")
    out_dir: str = option("runs/molf", "the run directory")
    resume: bool = option(False, "continue the run in --out-dir")
    reschedule: bool = option(False, "with --resume: accept another step count (--steps, "
                              "--epochs) than the run was started for; the learning-rate "
                              "schedule is rebuilt for it, so the rate changes at the resumed "
                              "step")

    lora_ranks: tuple[int, ...] | None = option(
        None, "ranks of the LoRA experts", group="LoRA experts",
        default_text="lora 32, molf and molf_gate 128, molfe 32 128")
    lora_alpha: tuple[float, ...] | None = option(
        None, "one alpha for all ranks, or one per rank; with rsLoRA s = alpha / sqrt(r)",
        default_text=f"{ROUTED_ALPHA:g} for routed experts, round(2 sqrt(r)) for lora, "
                     f"{ADALORA_ALPHA:g} for adalora")
    lora_dropout: float = option(0.05, "dropout on the LoRA experts' input")
    rslora: bool = option(True, "scale by alpha/r instead of alpha/sqrt(r)",
                          flag="--no-rslora")
    lora_targets: tuple[str, ...] = option(
        PROJECTIONS, "module names or regular expressions over module paths")

    fft_lr: float = option(5e-5, "peak learning rate of the FFT expert and non-routed leaves",
                           group="optimizer and routing")
    lora_lr: float | None = option(None, "peak learning rate of the LoRA experts",
                                   default_text="5e-5 in molf, molfe, molf_gate; 5e-4 in lora and adalora")
    fft_weight_decay: float = option(0.1, "AdamW weight decay of the FFT group")
    lora_weight_decay: float = option(0.01, "AdamW weight decay of the LoRA experts")
    top_k: int | None = option(None, "experts updated per module and step (molf, molfe)",
                               default_text="1, molfe 2")
    score: str = option("epd", f"routing score: {', '.join(SCORES)} (paper Eq. 10 and 11), or "
                        "package.module:name of your own molf_jax.routing.Score")
    train_embeddings_norms: bool = option(
        False, "molfe: also train embeddings, norms and non-target params (the authors' "
        "default; ours keeps them frozen: MoLF-Efficient's point is the frozen base)")
    schedule: str = option("cosine", "learning-rate shape shared by both groups",
                           choices=SCHEDULES)
    warmup_ratio: float = option(0.1, "share of the steps spent warming up")

    # peft's AdaLoraConfig names and defaults; its total_step is the run's optimizer steps.
    init_r: int | None = option(
        None, "adalora: every module's rank before pruning",
        default_text=f"peft's {MODES['adalora'].default_ranks[0]}",
        group="AdaLoRA (mode adalora; peft's AdaLoraConfig names and defaults; --lora-alpha "
              f"defaults to peft's {ADALORA_ALPHA:g}, --lora-lr, --lora-weight-decay and "
              "--lora-dropout apply)")
    target_r: int = option(8, "adalora: average rank per module at the end")
    tinit: int = option(0, "adalora: steps before any pruning")
    tfinal: int = option(0, "adalora: final steps that keep the final rank pattern")
    delta_t: int = option(1, "adalora: steps between allocations (peft's deltaT)")
    beta1: float = option(0.85, "adalora: smoothing of the sensitivity |p * g|")
    beta2: float = option(0.85, "adalora: smoothing of its uncertainty")
    orth_reg_weight: float = option(0.5, "adalora: weight of the orthogonality penalty")

    batch_size: int = option(8, "rows per micro-batch", group="batches and length")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(2.0, "passes over the training examples")
    steps: int | None = option(None, "optimizer steps (overrides --epochs)")
    max_length: int | None = option(None, "longest example in tokens",
                                    default_text="256, no cap under --protocol authors")
    overflow: str = option("drop", "examples longer than --max-length: drop (counted) or cut "
                           "the prompt from the left", choices=OVERFLOWS)

    param_dtype: str | None = option(
        None, "dtype of the parameters", choices=DTYPES, group="numerics and devices",
        default_text="the platform's: GPU and TPU bfloat16, CPU float32")
    state_dtype: str | None = option(None, "dtype of the optimizer moments", choices=DTYPES,
                                     default_text="the platform's, as --param-dtype")
    compute_dtype: str | None = option(None, "dtype of the activations", choices=DTYPES,
                                       default_text="the platform's, as --param-dtype")
    remat: str | None = option(None, "rematerialisation policy of each layer", choices=REMAT,
                               default_text="the platform's: GPU and TPU full, CPU none")
    attention: str | None = option(None, "attention kernel", choices=ATTENTION,
                                   default_text="the platform's: NVIDIA GPU cudnn, else xla")
    scan_layers: bool = option(True, "unroll the layers (default: one scanned block, faster "
                               "to compile)", flag="--no-scan-layers")
    loss_chunk: int = option(1024, "tokens per chunk of the output head and loss (bounds the "
                             "logits' memory)")
    merged_lora: bool = option(
        True, "molf/molf_gate: keep the factored LoRA products in training steps (default: "
        "one matmul with the merged kernel, same gradients; inactive while dropout is on)",
        flag="--no-merged-lora")
    mesh: str = option("data=1,fsdp=-1,tensor=1", "device mesh axis sizes (-1: all remaining "
                       "devices)")

    save_every: int = option(0, "checkpoint every N optimizer steps (0: only by time and at "
                             "the end)", group="logging and checkpoints")
    # Every 2 minutes: a killed main job loses at most that much, at any model size.
    save_every_minutes: float = option(2.0, "also checkpoint every M minutes of training "
                                       "(0: off); the last step is always saved")
    keep_checkpoints: int = option(2, "checkpoints kept on disk")
    log_every: int = option(1, "write metrics every N steps")
    routing_log_every: int = option(1, "write winners and scores every N steps (0: never)")
    tensorboard: bool = option(False, "also write TensorBoard events")
    max_nonfinite: int = option(3, "stop after N non-finite losses in a row (each skips its "
                                "step)")
    eval_before_after: bool = option(True, "skip the task evaluation before and after "
                                     "training", flag="--no-eval")
    eval_limit: int = option(64, "evaluation records scored")
    export: bool = option(True, "skip writing the merged HF folder and the PEFT adapter",
                          flag="--no-export")

    def __post_init__(self):
        _check(self)

    @property
    def recipe(self) -> Recipe:
        """The mode's ranks, alphas, LoRA rate and top-k for this config (`Mode.recipe`)."""
        return mode_of(self).recipe(self)

    ranks = property(lambda self: self.recipe.ranks, doc="the LoRA experts' ranks")
    alphas = property(lambda self: self.recipe.alphas, doc="the LoRA experts' alphas")
    lora_learning_rate = property(lambda self: self.recipe.lora_lr,
                                  doc="the LoRA experts' peak learning rate")
    routing_top_k = property(lambda self: self.recipe.top_k, doc="experts updated per module")

    @property
    def data_protocol(self) -> str:
        """The protocol in force: the one given, else 'molf_jax'."""
        return resolve_protocol(self.protocol)

    @property
    def length_cap(self) -> int | None:
        """Longest training example in tokens: ``max_length``, else the protocol's."""
        if self.max_length is not None:
            return self.max_length
        return PROTOCOL_SETTINGS[self.data_protocol].max_length

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _check(c: TrainConfig) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    for field in dataclasses.fields(c):
        allowed = choices_of(TrainConfig, field.name)
        value = getattr(c, field.name)
        need(allowed is None or value in allowed or (value is None and field.default is None),
             f"unknown {field.name.replace('_', '-')} {value!r}; choose one of "
             f"{', '.join(allowed or ())}")
        # inf or nan in any number (rates, decays, alphas, epochs) trains NaNs or never ends.
        numbers = value if isinstance(value, tuple) else (value,)
        need(all(not isinstance(v, float) or math.isfinite(v) for v in numbers),
             f"--{field.name.replace('_', '-')} must be a finite number, got "
             f"{' '.join(map(str, numbers))}")
    need(bool(c.out_dir.strip()), "--out-dir is empty; name a folder (the run directory)")
    if c.score not in SCORES:
        try:
            resolve_score(c.score)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    mode_of(c).check(c)
    need(c.lora_alpha is None or all(a > 0 for a in c.lora_alpha),
         f"--lora-alpha must be > 0 (the experts' scale), got {list(c.lora_alpha or ())}")
    need(c.lora_lr is None or c.lora_lr >= 0, f"lora-lr must be >= 0, got {c.lora_lr}")
    for name in ("fft_lr", "fft_weight_decay", "lora_weight_decay"):
        need(getattr(c, name) >= 0, f"{name.replace('_', '-')} must be >= 0, got "
                                    f"{getattr(c, name)}")
    need(0 <= c.lora_dropout < 1, f"lora-dropout must be in [0, 1), got {c.lora_dropout}")
    need(0 <= c.warmup_ratio < 1, f"warmup-ratio must be in [0, 1), got {c.warmup_ratio}")
    need(c.batch_size >= 1 and c.grad_accum >= 1, "batch-size and grad-accum must be >= 1")
    need(c.steps is None or 1 <= c.steps <= MAX_STEPS,
         f"--steps must be between 1 and {MAX_STEPS}, got {c.steps}")
    need(c.steps is not None or 0 < c.epochs <= MAX_EPOCHS,
         f"--epochs must be > 0 and at most {MAX_EPOCHS:g}, got {c.epochs}")
    need(c.max_length is None or c.max_length >= 8,
         f"max-length must be at least 8, got {c.max_length}")
    need(c.protocol in (None, *PROTOCOLS),
         f"unknown protocol {c.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    need(c.task_size >= 1, f"task-size must be >= 1, got {c.task_size}")
    need(c.max_nonfinite >= 1, "max-nonfinite must be >= 1")
    need(c.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got "
                                  f"{c.keep_checkpoints} (export reads the run's last one)")
    need(c.eval_limit >= 1, f"--eval-limit must be >= 1, got {c.eval_limit}")
    need(not c.reschedule or c.resume, "--reschedule applies to --resume only")
    need(c.loss_chunk >= 1, "loss-chunk must be >= 1")
    need(c.save_every_minutes >= 0,
         f"save-every-minutes must be >= 0, got {c.save_every_minutes}")
    need(c.save_every >= 0 and c.log_every >= 1 and c.routing_log_every >= 0,
         "save-every >= 0, log-every >= 1, routing-log-every >= 0")

