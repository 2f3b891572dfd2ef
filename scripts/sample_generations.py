"""Greedy continuations of the main job's edited facts: the base model next to a fine-tuned one.

A working export continues an edited prompt with the new target; a broken one (wrong weights,
a damaged folder) does not, or produces noise. Prints a Markdown table for the README:

    python scripts/sample_generations.py --tuned runs/molf/merged --cases 4

Each case gives its rewrite prompt and its first paraphrase, from the records `molf-jax train`
evaluates (offline fact task, default size and seed).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="default",
                        help="'default' (the embedded Gemma 3 270M) or an HF folder")
    parser.add_argument("--tuned", required=True, help="the fine-tuned HF folder")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from molf_jax.checkpoints import default_model_dir, load_hf
    from molf_jax.data import load_task
    from molf_jax.eval._runner import generate_texts, jax_generate_fn
    from molf_jax.models import build_model
    from molf_jax.train import TrainConfig

    defaults = TrainConfig()
    records = load_task("fact", "offline", size=defaults.task_size,
                        seed=defaults.seed).eval[:args.cases]
    prompts, targets = [], []
    for record in records:
        rewrite = record["requested_rewrite"]
        prompts.append(rewrite["prompt"].format(rewrite["subject"]))
        prompts.extend(record["paraphrase_prompts"][:1])
        targets += [rewrite["target_new"]["str"]] * (1 + len(record["paraphrase_prompts"][:1]))

    base = str(default_model_dir()) if args.base == "default" else args.base
    columns = []
    for folder in (base, args.tuned):
        config, params = load_hf(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        generate = jax_generate_fn(build_model(config), params, tokenizer,
                                   max_new_tokens=args.max_new_tokens)
        columns.append(generate_texts(prompts, tokenizer, generate, batch_size=len(prompts)))

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ").strip()

    print("| prompt | new target | base model | fine-tuned |")
    print("|---|---|---|---|")
    for prompt, target, before, after in zip(prompts, targets, *columns):
        print(f"| {cell(prompt)} | {cell(target)} | {cell(before)} | {cell(after)} |")


if __name__ == "__main__":
    main()
