"""Each stage's settings are written once, as a dataclass whose fields are made with
:func:`setting`; the program's command line (argparse) and the asset's launchpad config
(``dg.Config``, in ``coyo_platform.assets``) are both derived from it, defaults, help and choices
included, so they cannot drift. The dataclass validates itself in ``__post_init__``: a bad value
is a ``ValueError`` wherever the settings are made (the CLI, an asset, a program).

Field types are kept to what both sides can carry: ``int``, ``float``, ``str``, ``bool``, any of
them ``| None``, and ``tuple[T, ...]`` (a comma-separated flag; a list in the launchpad).
Imports no ``dagster``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from coyo_platform.common.provenance import BadInput

HELP, CHOICES = "help", "choices"


def setting(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A settings field: its default, the one-line help both the program's ``--help`` and the
    launchpad show, and, for a string, the values it may take."""
    metadata = {HELP: help, CHOICES: tuple(choices) if choices else None}
    if isinstance(default, list):
        raise TypeError("use a tuple default for a list setting")
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field's annotation means to both sides: the scalar type, optional or not, a list."""

    scalar: type
    optional: bool
    many: bool


def kind_of(cls: type, field: dataclasses.Field) -> Kind:
    hint = typing.get_type_hints(cls)[field.name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    if optional:
        [hint] = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return Kind(typing.get_args(hint)[0], optional, True)
    if hint not in (int, float, str, bool):
        raise TypeError(f"{cls.__name__}.{field.name}: unsupported setting type {hint}")
    return Kind(hint, optional, False)


def fields_of(cls: type) -> list[tuple[dataclasses.Field, Kind]]:
    """The settings fields of ``cls`` (those made with :func:`setting`) and their kinds."""
    return [(f, kind_of(cls, f)) for f in dataclasses.fields(cls) if HELP in f.metadata]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Sequence[str] | None = None,
    unset: bool = False,
) -> None:
    """One flag per setting of ``cls`` (or of those ``names``): ``--image-size 512``; booleans as
    ``--x`` / ``--no-x``; lists comma-separated (``--allow-networks 10.0.0.0/8,127.0.0.1``).
    With ``unset`` a flag not given parses as None (the help still shows the stage's default),
    so a caller passes on only what was asked for."""
    for field, kind in fields_of(cls):
        if names is not None and field.name not in names:
            continue
        options: dict[str, Any] = {"dest": field.name, "default": None if unset else field.default}
        shown = "none" if field.default in (None, ()) else field.default
        if kind.scalar is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind.many:
            options["type"] = _comma_list(kind.scalar)
            shown = ",".join(map(str, field.default)) if field.default else "none"
        else:
            options["type"] = kind.scalar
            options["choices"] = field.metadata[CHOICES]
        text = field.metadata[HELP]
        options["help"] = text if "default" in text else f"{text} (default: {shown})"
        parser.add_argument(flag(field.name), **options)


def _comma_list(scalar: type):
    def parse(text: str) -> tuple:
        return tuple(scalar(v.strip()) for v in text.split(",") if v.strip())

    parse.__name__ = f"comma-separated {scalar.__name__}s"
    return parse


def from_arguments(cls: type, args: argparse.Namespace) -> Any:
    """The settings the parsed command line gives (``BadInput``, a ``ValueError``, for a bad
    value)."""
    try:
        return cls(**{field.name: getattr(args, field.name) for field, _ in fields_of(cls)})
    except BadInput:
        raise
    except ValueError as err:
        raise BadInput(f"bad settings: {err}") from err


def to_arguments(values: Mapping[str, Any]) -> list[str]:
    """The command line that gives ``values`` (a settings mapping; ``None`` left out):
    booleans as ``--x`` / ``--no-x``, lists comma-joined."""
    args: list[str] = []
    for name, value in values.items():
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, list | tuple):
            args += [flag(name), ",".join(str(v) for v in value)]
        elif value is not None:
            args += [flag(name), str(value)]
    return args


def check_choices(settings: Any) -> None:
    """``ValueError`` for a string setting outside its choices (argparse checks its own flags;
    this holds for settings made any other way, the launchpad's included)."""
    for field, _ in fields_of(type(settings)):
        value, choices = getattr(settings, field.name), field.metadata[CHOICES]
        if choices and value is not None and value not in choices:
            raise ValueError(f"{field.name} must be one of {choices}, got {value!r}")


def program_parser(prog: str, cls: type, inputs: dict[str, str]) -> argparse.ArgumentParser:
    """A program's command line: its required ``inputs`` (flag -> help), then one flag per
    setting of ``cls``."""
    parser = argparse.ArgumentParser(prog=prog)
    for name, text in inputs.items():
        parser.add_argument(name, required=True, help=text)
    add_arguments(parser, cls)
    return parser
