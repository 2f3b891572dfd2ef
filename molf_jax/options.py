"""Config dataclasses that are also command lines: one declaration per option.

A field declared with `option` carries its help, its allowed values and its CLI group; the
``molf-jax`` subcommands turn such a dataclass into flags with `add_arguments` and back into
an instance with `from_arguments`. Adding an option to a command is adding one field.

Example:
  >>> import argparse, dataclasses
  >>> @dataclasses.dataclass(frozen=True, kw_only=True)
  ... class Demo:
  ...     mode: str = option("fast", "how to run", choices=("fast", "slow"))
  ...     ranks: tuple[int, ...] = option((8,), "LoRA ranks")
  ...     eval: bool = option(True, "evaluate at the end", flag="--no-eval")
  >>> parser = argparse.ArgumentParser()
  >>> add_arguments(parser, Demo)
  >>> from_arguments(Demo, parser.parse_args(["--ranks", "4", "16", "--no-eval"]))
  Demo(mode='fast', ranks=(4, 16), eval=False)
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

__all__ = ["add_arguments", "choices_of", "from_arguments", "option"]

_HELP, _CHOICES, _FLAG, _GROUP = "help", "choices", "flag", "group"
_DEFAULT_TEXT, _REQUIRED = "default_text", "required"


def option(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None,
           group: str | None = None, default_text: str | None = None,
           required: bool = False) -> Any:
    """A dataclass field that is also a command-line flag.

    Args:
      default: the field's default (a tuple stays a tuple: it is immutable).
      help: one line for ``--help``; the default is appended to it.
      choices: the allowed values (the single tuple that defines them); shown in ``--help``.
        The config checks them itself, so a bad value gets the config's own message.
      flag: the flag's name when not ``--<field-name>``; a bool defaulting to True becomes a
        ``--no-...`` switch and needs one.
      group: starts a new ``--help`` section at this field; later fields stay in it.
      default_text: how ``--help`` shows a default that needs words (e.g. None meaning
        "per mode").
      required: the command line must give the flag.

    Example:
      >>> option(8, "rows per batch").metadata["help"]
      'rows per batch'
    """
    metadata = {_HELP: help, _CHOICES: choices, _FLAG: flag, _GROUP: group,
                _DEFAULT_TEXT: default_text, _REQUIRED: required}
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(cls: type, name: str) -> tuple | None:
    """The allowed values declared for field ``name`` of config class ``cls`` (None: any)."""
    return next(f.metadata.get(_CHOICES) for f in dataclasses.fields(cls) if f.name == name)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *,
                  check_choices: bool = False) -> None:
    """Adds one flag per `option` field of dataclass ``cls`` (see the module example).

    Args:
      check_choices: argparse refuses values outside a field's choices (for a dataclass that
        does not check them itself); by default they reach the dataclass, whose own check
        says what is wrong.
    """
    group = parser
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if _HELP not in meta:
            continue
        if meta[_GROUP]:
            group = parser.add_argument_group(meta[_GROUP])
        flag = meta[_FLAG] or "--" + field.name.replace("_", "-")
        kind, many = _scalar_type(hints[field.name])
        if kind is bool:
            if field.default and not flag.startswith("--no-"):
                raise TypeError(f"{cls.__name__}.{field.name}: a bool that defaults to True "
                                "needs a '--no-...' flag")
            group.add_argument(flag, dest=field.name, help=meta[_HELP],
                               action="store_false" if field.default else "store_true")
            continue
        help_text = meta[_HELP] + ("" if meta[_REQUIRED] else _default_text(field, meta))
        kwargs: dict[str, Any] = {"dest": field.name, "type": kind, "help": help_text,
                                  "default": field.default, "required": meta[_REQUIRED]}
        if meta[_CHOICES] and check_choices:
            kwargs["choices"] = meta[_CHOICES]
        elif meta[_CHOICES]:
            kwargs["metavar"] = "{" + ",".join(map(str, meta[_CHOICES])) + "}"
        if many:
            kwargs["nargs"] = "+"
        group.add_argument(flag, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace):
    """Builds ``cls`` from parsed flags (lists become tuples; other attributes are ignored)."""
    values = {}
    for field in dataclasses.fields(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _default_text(field: dataclasses.Field, meta) -> str:
    if meta[_DEFAULT_TEXT]:
        return f" (default: {meta[_DEFAULT_TEXT]})"
    if field.default is None:
        return ""
    default = field.default
    if isinstance(default, tuple):
        default = " ".join(map(str, default))
    return f" (default: {default})"


def _scalar_type(hint) -> tuple[type, bool]:
    """``int`` -> (int, False); ``tuple[int, ...] | None`` -> (int, True)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return args[0], True
    return hint, False
