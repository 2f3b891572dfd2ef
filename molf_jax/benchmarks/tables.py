"""Prints the README's tables from bench_results/*.json (our runs), the authors' reference
measurements (bench_results/authors_torch_reference_h200.json) and bench_results/trainer/
(`molf-jax train` runs): speed and the first-step check, the memory model beside each measured
peak, the trainer's real tokens/s.

Example:
  python scripts/bench_table.py                   # speed, first-step check
  python scripts/bench_table.py --memory-model
  python scripts/bench_table.py --trainer
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from molf_jax.models import preset
from molf_jax.train import FFT_EXPERT_MODES

RESULTS = Path(__file__).resolve().parents[2] / "bench_results"  # the repository's
AUTHORS = {"fft": "fft", "lora": "lora_r32", "molf": "molf_fft_plus_r128_epd_top1",
           "molfe": "molfe_r16_r128_epd_top1"}
SIZES = {"3b": "qwen2.5-3b", "7b": "qwen2.5-7b", "gemma3-1b": "gemma3-1b"}


def describe(r: dict) -> str:
    setting = f"batch {r['batch']} x {r['length']}, remat {r['remat']}"
    if r.get("attention", "cudnn") != "cudnn":
        setting += f", {r['attention']} attention"
    if r.get("train_embeddings_norms"):
        setting += ", embeddings+norms trained"
    if r["mode"] in FFT_EXPERT_MODES and not r.get("merged_lora"):
        setting += ", factored LoRA"
    if r.get("unrouted_optimizer"):
        setting += ", ablation: plain AdamW (no routing)"
    if "pipelined" in r.get("xla_flags", ""):
        setting += ", XLA pipelined collectives"
    return setting


def bench_rows(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
            if not p.name.startswith("authors")]


def main(results: Path = RESULTS, section: str = "speed") -> None:
    """Prints one of the README's tables: ``speed`` (with the first-step check),
    ``memory-model`` or ``trainer``."""
    if section == "memory-model":
        return print_memory_model(bench_rows(results))
    if section == "trainer":
        return print_trainer_runs(results / "trainer", bench_rows(results))
    authors = json.loads((results / "authors_torch_reference_h200.json").read_text())
    # Their rows name the model by "size" (none: Qwen2.5-1.5B).
    theirs = {(SIZES.get(row.get("size"), "qwen2.5-1.5b"), row["mode"]): row
              for row in authors["results"]}
    rows = bench_rows(results)
    print("| model | mode | setting | GPUs | tokens/s | authors' tokens/s | peak GiB | "
          "authors' peak GiB | routing share | MFU | tokens/s per GPU | per GPU vs 1 GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"fft": 0, "lora": 1, "molf": 2, "molfe": 3}
    rows.sort(key=lambda r: (r["model"], order[r["mode"]], r.get("attention", ""), r["devices"],
                             r["batch"], r["remat"] != "full", r.get("tag", "")))
    for r in rows:
        ref = theirs.get((r["model"], AUTHORS[r["mode"]])) if r["devices"] == 1 else None
        routing = "" if r.get("routing_share") is None else f"{100 * r['routing_share']:.1f}%"
        ranks = "/".join(str(x) for x in r["ranks"])
        their_speed = f"{ref['tok_s']:,}" if ref else ""
        their_peak = f"{ref['peak_gib']}" if ref else ""
        per_gpu, scaling = "", ""
        if r["devices"] > 1:
            one = single_gpu_reference(rows, r)
            per_gpu = f"{r['tokens_per_s'] / r['devices']:,.0f}"
            scaling = f"{100 * r['tokens_per_s'] / r['devices'] / one['tokens_per_s']:.0f}%" \
                if one else ""
        print(f"| {r['model']} | {r['mode']}{' r' + ranks if ranks else ''} | {describe(r)} | "
              f"{r['devices']} | {r['tokens_per_s']:,.0f} | {their_speed} | "
              f"{r['peak_gib']:.1f} | {their_peak} | {routing} | {100 * r['mfu']:.0f}% | "
              f"{per_gpu} | {scaling} |")
    print_first_step_check(rows)


def print_first_step_check(rows: list[dict]) -> None:
    """The first step's loss of each checked run beside the same step unoptimised (XLA
    attention, no remat, factored LoRA; bf16) and in float32."""
    checked = [r for r in rows if r.get("first_loss_plain") is not None]
    if not checked:
        return
    print()
    print("| model | mode | setting | GPUs | first-step loss | unoptimised (bf16) | float32 |")
    print("|---|---|---|---|---|---|---|")
    for r in checked:
        f32 = r.get("first_loss_float32")
        print(f"| {r['model']} | {r['mode']} | {describe(r)} | {r['devices']} | "
              f"{r['first_loss']:.4f} | {r['first_loss_plain']:.4f} | "
              f"{'' if f32 is None else f'{f32:.4f}'} |")


def memory_model(r: dict) -> dict[str, float]:
    """The parts of a one-GPU step's peak memory in GiB, from parameter counts and the batch
    shape (bf16 weights and states, one micro-batch, full remat):

    weights 2 bytes per parameter; gradients 2 per trainable parameter (kept in the weights'
    dtype); Adam moments 4 per trainable parameter (mu and nu); activations, each layer's
    input [B, T, D] in bf16, the one thing full remat keeps per layer; the loss, one chunk of
    float32 logits [min(chunk, B T), vocab] and its gradient."""
    config = preset(r["model"])
    gib = 2.0 ** 30
    tokens = r["batch"] * r["length"]
    return {
        "weights": 2 * r["params"] / gib,
        "gradients": 2 * r["trainable_params"] / gib,
        "moments": 4 * r["trainable_params"] / gib,
        "activations": config.num_layers * tokens * config.hidden_size * 2 / gib,
        "loss": 2 * min(r.get("loss_chunk", 2048), tokens) * config.vocab_size * 4 / gib,
    }


def print_memory_model(rows: list[dict]) -> None:
    """Each one-GPU row's measured peak beside `memory_model`'s sum."""
    modelled = [r for r in rows if r["devices"] == 1 and r["remat"] == "full"
                and r["param_dtype"] == r["state_dtype"] == "bfloat16"]
    if not modelled:
        return
    print("| model | mode | setting | weights | gradients | moments | activations | loss | "
          "model GiB | measured GiB | measured / model |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in modelled:
        parts = memory_model(r)
        total = sum(parts.values())
        print(f"| {r['model']} | {r['mode']} | {describe(r)} | "
              + " | ".join(f"{v:.2f}" for v in parts.values())
              + f" | {total:.1f} | {r['peak_gib']:.1f} | {r['peak_gib'] / total:.2f} |")


def print_trainer_runs(folder: Path, rows: list[dict]) -> None:
    """``molf-jax train`` runs (their summary and metrics.jsonl, copied into ``folder`` as
    ``<model>_<mode>_<task>_summary.json`` / ``_metrics.jsonl``): real (non-padding) tokens per
    second, median over the steps after the first two (compilation), beside the bench's row."""
    summaries = sorted(folder.glob("*_summary.json")) if folder.is_dir() else []
    if not summaries:
        return
    print("| model | mode | task | batch | steps | real tokens/s (median, after compiling) | "
          "real share of the padded tokens | bench tokens/s (batch 8 x 512) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in summaries:
        summary = json.loads(path.read_text())
        stem = path.name[: -len("_summary.json")]
        task = stem.rsplit("_", 1)[1]
        config = json.loads((folder / f"{stem}_config.json").read_text())
        steps = [json.loads(line) for line in open(folder / f"{stem}_metrics.jsonl")]
        speed = statistics.median(m["tokens_per_s"] for m in steps[2:])
        padded = summary["steps"] * config["batch_size"] * config["max_length"]
        bench = next((r for r in rows if r["model"] == summary["model"] and
                      r["mode"] == summary["mode"] and r["devices"] == 1 and r["batch"] == 8
                      and r["length"] == 512 and r.get("tag") == "h200"), None)
        timed = "" if bench is None else f"{bench['tokens_per_s']:,.0f}"
        print(f"| {summary['model']} | {summary['mode']} | {task} | {config['batch_size']} x "
              f"{config['max_length']} | {summary['steps']} | {speed:,.0f} | "
              f"{100 * summary['tokens'] / padded:.0f}% | {timed} |")


def single_gpu_reference(rows: list[dict], r: dict) -> dict | None:
    """The one-GPU run with the same settings and the same rows per GPU as ``r``."""
    same = ("model", "mode", "remat", "attention", "length", "param_dtype", "state_dtype",
            "train_embeddings_norms", "unrouted_optimizer", "merged_lora")
    for other in rows:
        if other["devices"] == 1 and all(other.get(k) == r.get(k) for k in same) and \
                other["batch"] * r["devices"] == r["batch"]:
            return other
    return None


def cli(argv) -> None:
    """``python scripts/bench_table.py [FOLDER] [--speed|--memory-model|--trainer]``."""
    flags = [a for a in argv if a.startswith("--")]
    folders = [a for a in argv if not a.startswith("--")]
    main(Path(folders[0]) if folders else RESULTS, flags[0][2:] if flags else "speed")
