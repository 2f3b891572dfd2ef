"""The training configuration: one dataclass, the paper's hyperparameter names, checked early."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from molf_jax.data import PROTOCOL_SETTINGS, PROTOCOLS, TASKS, resolve_protocol
from molf_jax.models import PROJECTIONS
from molf_jax.options import choices_of, option
from molf_jax.routing import resolve_score

MODES = ("fft", "lora", "molf", "molfe", "molf_gate", "adalora")
# Modes whose optimizer routes between experts (they log routing), and those with an FFT expert.
ROUTED_MODES = ("molf", "molfe", "molf_gate")
FFT_EXPERT_MODES = ("molf", "molf_gate")
SCHEDULES = ("cosine", "linear", "constant")
SCORES = ("epd", "pfn")
REMAT = ("none", "full", "dots_saveable")
DTYPES = ("float32", "bfloat16")
OVERFLOWS = ("drop", "truncate_left")
ATTENTION = ("xla", "cudnn")

# The authors' recipe (arXiv 2605.07111 and their published code), per mode, used wherever a
# setting is left at None. Sources, one per value:
# - ranks: MoLF's one r128 expert (their config default); MoLF-E ranks 32 and 128 (their
#   MoLF-E quickstart); LoRA baseline r32 (their baseline scripts).
#   AdaLoRA: peft's AdaLoraConfig init_r 12 (every module's rank before pruning, --init-r).
DEFAULT_RANKS = {"fft": (), "lora": (32,), "molf": (128,), "molfe": (32, 128),
                 "molf_gate": (128,), "adalora": (12,)}
# - alpha: routed experts 32 with rsLoRA (their config default; s = 32 / sqrt(r)). The LoRA
#   baseline follows their scripts' rsLoRA rule alpha = round(2 sqrt(r)) (r 32 -> 11).
ROUTED_ALPHA = 32.0
#   AdaLoRA: peft's LoraConfig default 8 (its scale is alpha / init_r, no rsLoRA).
ADALORA_ALPHA = 8.0


def baseline_alpha(rank: int) -> float:
    """The authors' LoRA-baseline alpha for a rank: round(2 sqrt(r)).

    Example:
      >>> baseline_alpha(32)
      11.0
    """
    return float(round(2 * rank ** 0.5))


# - LoRA learning rate: MoLF and MoLF-E use the FFT rate, 5e-5 (their README quickstart: EPD
#   multiplies each expert's score by its rate, so unequal rates bias the routing); the LoRA
#   baseline takes 5e-4, the first value of their sweep {5e-4, 5e-5}. FFT: 5e-5, the middle
#   of their sweep {1e-4, 5e-5, 2e-5} and their MoLF quickstart's rate. AdaLoRA, the other
#   adapter baseline, takes the LoRA baseline's rate.
DEFAULT_LORA_LR = {"fft": 5e-4, "lora": 5e-4, "molf": 5e-5, "molfe": 5e-5, "molf_gate": 5e-5,
                   "adalora": 5e-4}
# - top-k: MoLF top-1 (paper default); MoLF-E top-2 (their MoLF-E quickstart).
DEFAULT_TOP_K = {"fft": 1, "lora": 1, "molf": 1, "molfe": 2, "molf_gate": 1, "adalora": 1}
# Warm-up ratio 0.1 (warm-up = ceil(0.1 x steps), as their HF Trainer counts it), weight decay
# 0.1 / 0.01, dropout 0.05, cosine: the field defaults below. Their effective batch is 32
# (8 x grad-accum 4) for 2 epochs; the CLI keeps 8 x 1 so that the main job runs in minutes on
# a CPU (`--grad-accum 4` gives theirs; scripts/reproduce.py does).


# The step counter is an int32 on the devices; epochs are bounded so that their step count is.
MAX_STEPS = 2**31 - 1
MAX_EPOCHS = 1e6


class ConfigError(ValueError):
    """A training configuration that cannot run; the message says which setting and why."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run needs to know; ``molf-jax train`` has one flag per field.

    Each field's help (also ``molf-jax train --help``) says what it sets. The paper's two
    parameter groups are ``fft_*`` (the FFT expert and the non-routed leaves) and ``lora_*``.
    Numerics and kernels left None (the default) take the platform's choice when the run starts
    (`molf_jax.train.platform.with_platform_defaults`).

    Defaults left at None follow the authors' recipe for the mode (see the constants above).

    Example:
      >>> TrainConfig(mode="molfe").ranks, TrainConfig(mode="molfe").routing_top_k
      ((32, 128), 2)
    """

    mode: str = option("molf", "fft, lora, molf (FFT expert + LoRA experts), molfe (frozen "
                       "base, LoRA experts of several ranks), molf_gate (molf's experts gated "
                       "before AdamW: the approximate form, DESIGN.md section 2) or adalora "
                       "(frozen base, AdaLoRA triplets pruned by peft's rank allocator)",
                       choices=MODES, group="run")
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
        default_text=f"peft's {DEFAULT_RANKS['adalora'][0]}",
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
    def ranks(self) -> tuple[int, ...]:
        if self.mode == "adalora" and self.init_r is not None:
            return (self.init_r,)
        return tuple(self.lora_ranks) if self.lora_ranks is not None else DEFAULT_RANKS[self.mode]

    @property
    def lora_learning_rate(self) -> float:
        return DEFAULT_LORA_LR[self.mode] if self.lora_lr is None else self.lora_lr

    @property
    def routing_top_k(self) -> int:
        return DEFAULT_TOP_K[self.mode] if self.top_k is None else self.top_k

    @property
    def alphas(self) -> tuple[float, ...]:
        if self.mode == "adalora":
            return (ADALORA_ALPHA if self.lora_alpha is None
                    else float(self.lora_alpha[0]),)
        if self.lora_alpha is None:
            if self.mode == "lora":
                return tuple(baseline_alpha(r) for r in self.ranks)
            return tuple(ROUTED_ALPHA for _ in self.ranks)
        if len(self.lora_alpha) == 1:
            return tuple(float(self.lora_alpha[0]) for _ in self.ranks)
        return tuple(float(a) for a in self.lora_alpha)

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
    if c.mode == "adalora":
        need(c.lora_ranks is None, "mode 'adalora' takes --init-r and --target-r, not "
                                   "--lora-ranks")
        need(c.lora_alpha is None or len(c.lora_alpha) == 1,
             f"mode 'adalora' takes one --lora-alpha, got {list(c.lora_alpha or ())}")
        need(c.orth_reg_weight >= 0, f"orth-reg-weight must be >= 0, got {c.orth_reg_weight}")
        check_adalora_schedule(c, c.steps)
    elif c.lora_alpha is not None:
        need(len(c.lora_alpha) in (1, len(ranks)),
             f"give one LoRA alpha or one per rank ({len(ranks)}), got {list(c.lora_alpha)}")
    need(c.lora_alpha is None or all(a > 0 for a in c.lora_alpha),
         f"--lora-alpha must be > 0 (the experts' scale), got {list(c.lora_alpha or ())}")
    experts = len(ranks) + (1 if c.mode in FFT_EXPERT_MODES else 0)
    if c.mode in ROUTED_MODES:
        need(isinstance(c.routing_top_k, int) and 1 <= c.routing_top_k <= experts,
             f"top-k must be between 1 and the number of experts per module ({experts}), "
             f"got {c.routing_top_k}")
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


def check_adalora_schedule(c: TrainConfig, total_steps: int | None):
    """The AdaLoRA schedule for ``total_steps`` optimizer steps (None: all but the fit with the
    step count is checked), or ConfigError with peft's reason."""
    from molf_jax.adalora import AdaLoraSchedule

    try:
        return AdaLoraSchedule(
            total_step=total_steps if total_steps is not None else c.tinit + c.tfinal + 1,
            init_r=c.ranks[0], target_r=c.target_r, tinit=c.tinit, tfinal=c.tfinal,
            deltaT=c.delta_t, beta1=c.beta1, beta2=c.beta2)
    except ValueError as err:
        message = str(err).replace("deltaT", "delta-t").replace("init_r", "init-r")
        raise ConfigError(f"adalora: {message.replace('target_r', 'target-r')}") from None
