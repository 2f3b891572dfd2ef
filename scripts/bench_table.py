"""Prints the README's speed table from bench_results/*.json (our runs) and the authors'
reference measurements (bench_results/authors_torch_reference_h200.json).

Example:
  python scripts/bench_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from molf_jax.train.config import FFT_EXPERT_MODES

RESULTS = Path(__file__).resolve().parents[1] / "bench_results"
AUTHORS = {"fft": "fft", "lora": "lora_r32", "molf": "molf_fft_plus_r128_epd_top1",
           "molfe": "molfe_r16_r128_epd_top1"}


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


def main(results: Path = RESULTS) -> None:
    authors = json.loads((results / "authors_torch_reference_h200.json").read_text())
    theirs = {row["mode"]: row for row in authors["results"]}
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
            if not p.name.startswith("authors")]
    print("| model | mode | setting | GPUs | tokens/s | authors' tokens/s | peak GiB | "
          "authors' peak GiB | routing share | MFU | tokens/s per GPU | per GPU vs 1 GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"fft": 0, "lora": 1, "molf": 2, "molfe": 3}
    rows.sort(key=lambda r: (r["model"], order[r["mode"]], r.get("attention", ""), r["devices"],
                             r["batch"], r["remat"] != "full", r.get("tag", "")))
    for r in rows:
        ref = theirs.get(AUTHORS[r["mode"]]) if r["model"] == "qwen2.5-1.5b" else None
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


def single_gpu_reference(rows: list[dict], r: dict) -> dict | None:
    """The one-GPU run with the same settings and the same rows per GPU as ``r``."""
    same = ("model", "mode", "remat", "attention", "length", "param_dtype", "state_dtype",
            "train_embeddings_norms", "unrouted_optimizer", "merged_lora")
    for other in rows:
        if other["devices"] == 1 and all(other.get(k) == r.get(k) for k in same) and \
                other["batch"] * r["devices"] == r["batch"]:
            return other
    return None

if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
