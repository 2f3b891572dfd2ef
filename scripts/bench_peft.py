"""Times peft's AdaLoRA (and LoRA r32, for the ratio) with torch on a GPU, the way the authors'
reference numbers were measured (bench_results/authors_torch_reference_h200.json).

Qwen2.5-1.5B architecture with random weights (the shapes of our ``qwen2.5-1.5b`` preset, handed
to transformers), batch 8 x 512 random tokens, bf16 weights and optimizer states (adapters
too), bf16 autocast, gradient checkpointing, SDPA attention; median of 10 steps after 3
warm-up steps. A step is forward + backward + ``optimizer.step()`` (+ AdaLoRA's
``update_and_allocate``, called after the optimizer as peft's docs say) + ``zero_grad``; the
optimizer (and the allocator) are also timed alone. AdaLoRA with peft's defaults (init_r 12,
target_r 8, deltaT 1, orth_reg_weight 0.5, alpha 8) and total_step 1000, so every timed step
allocates, as ours does in ``scripts/bench.py --mode adalora``.

Example (one H200):
  python scripts/bench_peft.py --out bench_results/torch_peft_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["adalora", "lora_r32"],
                   choices=["adalora", "lora_r32"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="bench_results/torch_peft_h200.json")
    return p.parse_args(argv)


def hf_config():
    import transformers

    from molf_jax import models

    return transformers.Qwen2Config(**models.preset("qwen2.5-1.5b").to_hf())


def peft_model(mode: str):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(), attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "adalora":
        config = peft.AdaLoraConfig(init_r=12, target_r=8, total_step=1000, lora_alpha=8,
                                    lora_dropout=0.0, target_modules=TARGETS,
                                    task_type="CAUSAL_LM")
    else:  # the authors' LoRA baseline: r 32, alpha 11, rsLoRA
        config = peft.LoraConfig(r=32, lora_alpha=11, use_rslora=True, lora_dropout=0.0,
                                 target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config, autocast_adapter_dtype=False)


def time_mode(mode: str, args) -> dict:
    import torch

    model = peft_model(mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), device="cuda")
    step_times, opt_times, alloc_times = [], [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.cuda.synchronize()
        opt_start = time.perf_counter()
        optimizer.step()
        torch.cuda.synchronize()
        alloc_start = time.perf_counter()
        if mode == "adalora":
            model.base_model.update_and_allocate(step)
        torch.cuda.synchronize()
        end = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)
            opt_times.append(alloc_start - opt_start)
            alloc_times.append(end - alloc_start)
    step_s = statistics.median(step_times)
    row = {"mode": mode, "step_s": round(step_s, 4),
           "opt_s": round(statistics.median(opt_times), 4),
           "tok_s": round(args.batch * args.length / step_s),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
           "trainable_m": round(sum(p.numel() for p in params) / 1e6, 1),
           "step_s_all": [round(t, 4) for t in step_times]}
    if mode == "adalora":
        row["allocate_s"] = round(statistics.median(alloc_times), 4)
        row["rank_budget_after"] = int(sum(
            int((m.lora_E["default"] != 0).sum()) for m in model.modules()
            if hasattr(m, "lora_E") and "default" in m.lora_E))
    del model, optimizer
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    import peft
    import torch
    import transformers

    args = parse_args(argv)
    results = []
    for mode in args.modes:
        results.append(time_mode(mode, args))
        print(json.dumps(results[-1]), flush=True)
    record = {
        "what": "peft's AdaLoRA and LoRA r32 with torch, timed like the authors' reference",
        "setup": {"model": "Qwen2.5-1.5B architecture, random init", "batch": args.batch,
                  "seq_len": args.length, "dtype": "bf16 weights, adapters and optimizer "
                  "states, bf16 autocast", "gradient_checkpointing": True, "attention": "sdpa",
                  "software": f"torch {torch.__version__}, transformers "
                              f"{transformers.__version__}, peft {peft.__version__}",
                  "device": torch.cuda.get_device_name(),
                  "timing": f"median of {args.steps} steps after {args.warmup} warm-up steps; "
                            "forward+backward+optimizer(+update_and_allocate); optimizer and "
                            "allocator also timed alone",
                  "command": "python scripts/bench_peft.py"},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
