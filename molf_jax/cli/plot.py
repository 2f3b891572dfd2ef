"""The ``molf-jax plot`` subcommand: PNGs of a run's routing dynamics and loss curve.

Example::

    molf-jax plot runs/molf --out figures/molf

writes ``routing_fraction.png`` (share of modules choosing the FFT expert, or each LoRA rank in
MoLF-E, per projection type), ``routing_heatmap.png`` (winning expert per layer and step) and
``loss.png``; fft and lora runs get the loss curve only.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``plot`` subcommand (``func=main``) to a CLI's subparsers.

    Example:
      >>> parser = argparse.ArgumentParser()
      >>> _ = register(parser.add_subparsers(dest="command"))
      >>> parser.parse_args(["plot", "runs/molf"]).out is None
      True
    """
    p = subparsers.add_parser("plot", help="draw a run's routing dynamics and loss as PNGs",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by 'molf-jax train'")
    p.add_argument("--out", default=None, metavar="DIR", help="where the PNGs go "
                   "(default RUN_DIR/plots)")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Draws the plots of ``args.run_dir``; prints the files written; returns the exit status.

    Missing or malformed logs raise FileNotFoundError / ValueError with a message naming the
    file, which the ``molf-jax`` entry point prints without a traceback.
    """
    from molf_jax.paths import writable_folder
    from molf_jax.viz import plot_run

    if args.out is not None:  # checked before the logs are read
        writable_folder(args.out, "--out")
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
