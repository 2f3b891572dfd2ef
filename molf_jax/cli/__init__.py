"""``molf-jax``: train | eval | export | plot.

Each subcommand is one module of this package with ``register(subparsers)`` and ``main(args)``;
``train`` takes its flags from `molf_jax.train.TrainConfig`'s fields (`molf_jax.options`).

Example:
  >>> from molf_jax.cli import build_parser
  >>> build_parser().parse_args(["plot", "runs/molf"]).command
  'plot'
"""

from __future__ import annotations

import argparse
import logging
import sys

from molf_jax.cli import eval as eval_command
from molf_jax.cli import export, plot, train
from molf_jax.device_memory import use_device_memory

__all__ = ["build_parser", "main"]

_COMMANDS = (train, eval_command, export, plot)
# The commands that place arrays on devices: JAX's allocator is sized before they start.
_DEVICE_COMMANDS = ("train", "eval", "export")

# Errors that describe bad input: printed as one message with exit status 2, no traceback
# (OSError too: file-system errors the user can fix).
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    """The ``molf-jax`` parser with its four subcommands."""
    parser = argparse.ArgumentParser(prog="molf-jax",
                                     description="MoLF fine-tuning: train | eval | export | plot")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``molf-jax`` on ``argv``; returns the exit status (2 for bad input)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in _DEVICE_COMMANDS:
        print(f"molf-jax {args.command}: {use_device_memory()}", file=sys.stderr, flush=True)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (*_USER_ERRORS, OSError) as err:
        if args.debug:
            raise
        print(f"molf-jax {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


def _message(err: Exception) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    # File-system errors a user can fix (exists, not a folder, not writable, disk full).
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
