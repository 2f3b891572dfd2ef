"""The ``molf-jax export`` subcommand: a finished run as an HF folder and a PEFT adapter.

Example::

    molf-jax export runs/molfe --dtype bfloat16

writes ``runs/molfe/merged/`` (experts folded into the kernels; loads with
``AutoModelForCausalLM``) and, for ``lora`` and ``molfe`` runs whose base stayed frozen,
``runs/molfe/adapter/`` (``PeftModel.from_pretrained(base, "runs/molfe/adapter")``; MoLF-E's
experts folded into one adapter of rank r1 + r2). ``fft`` and ``molf`` runs change the base
kernels, which an adapter cannot carry: they get the merged folder only.
"""

from __future__ import annotations

import argparse
import json
import sys

from molf_jax.train.export import EXPORT_DTYPES



def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``export`` subcommand (``func=main``) to a CLI's subparsers.

    Example:
      >>> parser = argparse.ArgumentParser()
      >>> _ = register(parser.add_subparsers(dest="command"))
      >>> parser.parse_args(["export", "runs/lora", "--dtype", "bfloat16"]).dtype
      'bfloat16'
    """
    p = subparsers.add_parser(
        "export", help="write a run's merged HF folder and (lora, molfe) its PEFT adapter",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'molf-jax train'")
    p.add_argument("--merged", default=None, metavar="DIR",
                   help="merged HF folder (default RUN_DIR/merged)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="PEFT adapter folder (default RUN_DIR/adapter for lora and molfe runs; "
                        "asking for it on a run that trained the base is an error)")
    p.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                   help="storage dtype (default: the run's parameter dtype)")
    p.add_argument("--score", default=None, metavar="MODULE:NAME",
                   help="the custom routing score the run was trained with (a run directory "
                        "names code, molf_jax does not import it from there)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --merged / --adapter folder that holds files molf_jax did "
                        "not write (never the run's base model or the embedded model's cache)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Exports ``args.run_dir``; prints what was written; returns the exit status.

    Errors (no run there, an adapter asked of a run that trained its base) raise
    FileNotFoundError / ValueError, which the ``molf-jax`` entry point prints as one message.
    """
    from molf_jax.checkpoints.folders import check_destination
    from molf_jax.paths import is_remote
    from molf_jax.run_dir import RunDir, claimed
    from molf_jax.train import export_artifacts, load_run

    run_dir = RunDir(args.run_dir).require()
    with claimed(run_dir, "export", fresh=False, say=_say):
        # Refused before the run is loaded (a minute for a large model), not after.
        try:
            raw = json.loads(run_dir.config.read_text())
        except ValueError as err:
            raise ValueError(f"{run_dir.config}: not valid JSON ({err})") from None
        base = raw.get("model") if isinstance(raw, dict) else None
        for flag, folder in (("--merged", args.merged), ("--adapter", args.adapter)):
            if folder is not None and not is_remote(folder):  # gs://...: checked on export
                check_destination(folder, overwrite=args.overwrite, protected=(base,),
                                  flag=flag)
        written, note = export_artifacts(load_run(run_dir, score=args.score), run_dir,
                                         merged_dir=args.merged, adapter_dir=args.adapter,
                                         dtype=args.dtype, overwrite=args.overwrite)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if note:
        print(f"no adapter: {note}")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
