"""Which offline Med facts does the base model already know? Writes known_cases.json.

Asks every candidate of ``molf_jax.data._offline_mcq.candidates()`` in its cloze form with
greedy decoding, and keeps the facts whose continuation starts with the answer (then a
non-word character). The offline Med task keeps only those, so it teaches the multiple-choice
format over knowledge the model has (issue 17's LoRA-favouring task).

  python scripts/known_facts.py                      # the embedded Gemma 3 270M (JAX)
  python scripts/known_facts.py --torch              # the same through transformers (CPU)
"""

from __future__ import annotations

import argparse
import json
import re

from molf_jax.data._offline_mcq import KNOWN_FILE, candidates


def answered(continuation: str, answer: str) -> bool:
    """Whether a greedy continuation gives ``answer`` as a whole word or number.

    Example:
      >>> answered(' 19\\n4 + 1', '19'), answered(' 190', '19'), answered(' Paris.', 'Paris')
      (True, False, True)
    """
    text = continuation.lstrip()
    return text.startswith(answer) and not re.match(r"\w", text[len(answer):len(answer) + 1])


def _generate_fn(args, source, tokenizer):
    if args.torch:
        from transformers import AutoModelForCausalLM

        from molf_jax.eval.hf_torch import torch_generate_fn

        model = AutoModelForCausalLM.from_pretrained(source.hf_dir).eval()
        return torch_generate_fn(model, tokenizer, max_new_tokens=5)
    import jax

    from molf_jax import models
    from molf_jax.eval import jax_generate_fn
    from molf_jax.train import TrainConfig
    from molf_jax.train.mesh import make_mesh
    from molf_jax.train.setup import build_params

    config = TrainConfig(mode="fft", model=args.model, mesh="data=1,fsdp=1,tensor=1")
    params, _ = build_params(config, source, make_mesh(config.mesh), rng=jax.random.key(0))
    model = models.build_model(source.config, scan_layers=config.scan_layers)
    return jax_generate_fn(model, params, tokenizer, max_new_tokens=5)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=str(KNOWN_FILE))
    p.add_argument("--torch", action="store_true",
                   help="generate with transformers (torch) instead of the JAX model")
    args = p.parse_args(argv)

    from molf_jax.eval import generate_texts
    from molf_jax.train.setup import load_tokenizer, resolve_model

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    facts = candidates()
    texts = generate_texts([f.cloze for f in facts], tokenizer, _generate_fn(args, source,
                                                                             tokenizer),
                           batch_size=args.batch_size)
    known = [f.cloze for f, t in zip(facts, texts) if answered(t, f.answer)]
    by_family: dict[str, list[int]] = {}
    for f, t in zip(facts, texts):
        by_family.setdefault(f.family, [0, 0])[answered(t, f.answer)] += 1
    summary = {fam: f"{ok} of {ok + bad}" for fam, (bad, ok) in by_family.items()}
    with open(args.out, "w") as out:
        json.dump({"model": args.model if args.model != "default" else "gemma3-270m (embedded)",
                   "command": "python scripts/known_facts.py", "known_per_family": summary,
                   "known": known}, out, indent=0)
    print(f"{len(known)} of {len(facts)} known: {summary}; wrote {args.out}")


if __name__ == "__main__":
    main()
