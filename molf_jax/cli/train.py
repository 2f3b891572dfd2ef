"""``molf-jax train``: one flag per `TrainConfig` field, with the paper's hyperparameter names.

Example:
  >>> import argparse
  >>> parser = argparse.ArgumentParser()
  >>> _ = register(parser.add_subparsers(dest="command"))
  >>> config_from_args(parser.parse_args(["train", "--mode", "molfe", "--no-eval"])).ranks
  (32, 128)
"""

from __future__ import annotations

import argparse

from molf_jax.options import add_arguments, from_arguments
from molf_jax.train.config import TrainConfig


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``train`` to a CLI's subparsers (``func=main``)."""
    p = subparsers.add_parser(
        "train", help="fine-tune with fft, lora, molf, molfe, molf_gate or adalora",
        description="With no arguments: MoLF on the embedded Gemma 3 270M, offline Fact task, "
                    "evaluated before and after, exported to RUN_DIR/merged.")
    add_arguments(p, TrainConfig)
    p.set_defaults(func=main)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` that parsed ``train`` flags describe."""
    return from_arguments(TrainConfig, args)


def main(args: argparse.Namespace) -> int:
    from molf_jax.train.loop import train

    train(config_from_args(args))
    return 0
