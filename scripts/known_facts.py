"""Which offline Med facts does the base model already know? Writes known_cases.json.

A fact is known when greedy decoding from its cloze prompt writes the answer (then no further
letter or digit): "2 + 2 =" -> " 4", 'The opposite of "hot" is "' -> 'cold"'. All 3,371
candidates of ``molf_jax.data._offline_mcq.candidates()`` are checked with one teacher-forced
forward pass per batch (``molf_jax.eval.teacher_forced_argmax``), which decides exactly what
greedy decoding would write, without generating token by token. The offline Med task keeps the
known facts, so it teaches the multiple-choice format over knowledge the model has (issue 17's
LoRA-favouring task).

  python scripts/known_facts.py                      # the embedded Gemma 3 270M (585 s, 2 cores)
  python scripts/known_facts.py --cross-check 200    # also generate 200 facts greedily, compare
"""

from __future__ import annotations

import argparse
import json
import random
import time

from molf_jax.data._offline_mcq import KNOWN_FILE, candidates
from molf_jax.eval import answered, known_by_forcing


def known_by_generating(facts, model, params, tokenizer, *, batch_size: int) -> list[bool]:
    """The same question answered by generating 5 tokens greedily (slow; a cross-check)."""
    from molf_jax.eval import generate_texts, jax_generate_fn

    generate = jax_generate_fn(model, params, tokenizer, max_new_tokens=5)
    texts = generate_texts([f.cloze for f in facts], tokenizer, generate, batch_size=batch_size)
    return [answered(t, f.answer) for f, t in zip(facts, texts)]


def _model(name: str):
    from molf_jax import models
    from molf_jax.train import TrainConfig, assemble_run, plan_run

    config = TrainConfig(mode="fft", model=name, mesh="data=1,fsdp=1,tensor=1")
    run = assemble_run(plan_run(config))
    # Generation runs build_model's default model, not the run's training model.
    model = models.build_model(run.source.config, scan_layers=config.scan_layers)
    return model, run.params, run.tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=str(KNOWN_FILE))
    p.add_argument("--cross-check", type=int, default=0, metavar="N",
                   help="also generate N random facts greedily and count disagreements")
    args = p.parse_args(argv)

    model, params, tokenizer = _model(args.model)
    facts = candidates()
    start = time.perf_counter()
    known = known_by_forcing(facts, model, params, tokenizer, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    by_family: dict[str, list[int]] = {}
    for f, ok in zip(facts, known):
        by_family.setdefault(f.family, [0, 0])[ok] += 1
    summary = {fam: f"{ok} of {ok + bad}" for fam, (bad, ok) in by_family.items()}
    with open(args.out, "w") as out:
        json.dump({"model": args.model if args.model != "default" else "gemma3-270m (embedded)",
                   "command": "python scripts/known_facts.py", "known_per_family": summary,
                   "known": [f.cloze for f, ok in zip(facts, known) if ok]}, out, indent=0)
    print(f"{sum(known)} of {len(facts)} known ({seconds:.0f} s for the forced check): "
          f"{summary}; wrote {args.out}")
    if args.cross_check:
        sample = sorted(random.Random(0).sample(range(len(facts)), args.cross_check))
        start = time.perf_counter()
        generated = known_by_generating([facts[i] for i in sample], model, params, tokenizer,
                                        batch_size=args.batch_size)
        differ = [facts[i].cloze for i, g in zip(sample, generated) if g != known[i]]
        print(f"cross-check: greedy generation of {len(sample)} facts "
              f"({time.perf_counter() - start:.0f} s) disagrees on {len(differ)}: {differ}")


if __name__ == "__main__":
    main()
