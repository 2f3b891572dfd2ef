"""``molf-jax``: train | eval | export | plot."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, what it adds); each module exposes register(subparsers).
_COMMANDS = ("molf_jax.train.command", "molf_jax.eval.command", "molf_jax.export_command",
             "molf_jax.plot_command")

# Errors that describe bad input: printed as one message with exit status 2, no traceback.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molf-jax", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"molf-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
