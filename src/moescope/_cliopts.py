"""Options dataclasses as the one source of command-line flags.

A command's settings are one dataclass (``AnalyzeOptions``, ``CompareOptions``,
``ParamsOptions``, ``WatchOptions``); each field declared with :func:`option` carries its
help text and, where the annotation does not say it, how it is spelled on the command line.
:func:`add_options` turns the fields into ``argparse`` arguments and
:func:`options_from_args` builds the dataclass back from the parsed namespace, so a flag,
its default and its help are written once, next to the field. No heavy import here.

Derived from the field: the flag (``--seq-len`` for ``seq_len``), required when the field
has no default, the type (``int | None`` -> ``int``), ``store_true`` for a bool defaulting
to False and ``--no-<name>`` for one defaulting to True, ``append`` for a list, and
"(default: X)" in the help.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["add_options", "option", "option_help", "options_from_args", "parse_size"]

_KEY = "moescope.cli"


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    metavar: str | None = None,
    type: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    group: str | None = None,
    positional: bool = False,
    flag: str | None = None,
    cli: bool = True,
    show_default: bool = True,
) -> Any:
    """A dataclass field with its command-line spelling (module docstring).

    Args:
        default / default_factory: as :func:`dataclasses.field`; none = required.
        help: the one help text of the setting (also returned by :func:`option_help`).
        metavar, type, choices: as ``argparse.add_argument`` (``type`` only where the
            annotation's own type does not parse the text, e.g. sizes).
        group: argument group title in ``--help``.
        positional: a positional argument instead of ``--flag``.
        flag: the flag when not ``--`` + the field name with dashes.
        cli: False for a library-only field (no flag).
        show_default: append "(default: X)" to the help.
    """
    meta = {
        _KEY: {
            "help": help,
            "metavar": metavar,
            "type": type,
            "choices": choices,
            "group": group,
            "positional": positional,
            "flag": flag,
            "cli": cli,
            "show_default": show_default,
        }
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_help(cls: type, name: str) -> str:
    """The help text of field ``name`` of options class ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.metadata[_KEY]["help"])
    raise KeyError(name)


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB`` or a plain number (an argparse ``type``)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad size {text!r}; use bytes or a suffix, e.g. 512M or 2G"
        ) from None


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the scalar type, is a list) of a field annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        return (inner[0] if inner else str), True
    return annotation, False


def _default_text(value: Any) -> str | None:
    if value is None or value is False or value is True or value == []:
        return None
    return str(value)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per :func:`option` field of dataclass ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_KEY)
        if meta is None or not meta["cli"]:
            continue
        target: Any = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else _field_default(f)
        typ, is_list = _base_type(hints[f.name])
        helptext = str(meta["help"])
        kw: dict[str, Any] = {"dest": f.name}
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if typ is bool and not is_list:
            if default:  # a switch that is on unless turned off
                flag = meta["flag"] or "--no-" + f.name.replace("_", "-")
                kw.update(action="store_false", default=True)
            else:
                kw.update(action="store_true", default=False)
            target.add_argument(flag, help=helptext, **kw)
            continue
        kw["type"] = meta["type"] or (typ if typ in (int, float) else str)
        if meta["choices"] is not None:
            kw["choices"] = meta["choices"]
        if meta["metavar"] is not None:
            kw["metavar"] = meta["metavar"]
        shown = _default_text(default)
        if meta["show_default"] and shown is not None:
            helptext += f" (default: {shown})"
        if meta["positional"]:
            kw.pop("dest")
            target.add_argument(f.name, help=helptext, **kw)
            continue
        if is_list:
            kw["action"] = "append"
        kw["required"] = required
        kw["default"] = None if is_list else default
        target.add_argument(flag, help=helptext, **kw)


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def options_from_args(args: argparse.Namespace, cls: type) -> Any:
    """The ``cls`` instance of parsed ``args`` (fields without a flag keep their
    defaults; a list option given no time keeps its default)."""
    given = vars(args)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in given:
            continue
        if given[f.name] is None and _base_type(hints[f.name])[1]:
            continue  # an append option not given: the field's own default
        kwargs[f.name] = given[f.name]
    return cls(**kwargs)
