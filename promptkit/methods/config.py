"""Method settings from the command line: ``KEY=VALUE`` pairs, typed and range-checked before any work starts.

``parse_pairs`` is the one parser of repeatable ``KEY=VALUE`` flags (``--set``, ``--ood``). ``apply_settings``
turns a method's settings into its config: each value is coerced to the type its dataclass field declares
(``int``, ``float``, ``bool``, ``str``, ``X | None``, ``Literal[...]``) and checked against its allowed values,
then the config is built with its presets (``resolve_config``) and its own ``__post_init__`` checks. Every
refusal is a ``ConfigError`` naming the flag, the key, the value and what is allowed.

Allowed values of a field, first found wins:

1. the field's metadata: ``dataclasses.field(default=..., metadata={"choices": (...)})`` or any of ``"min"``,
   ``"max"`` (inclusive), ``"gt"``, ``"lt"`` (exclusive) for numbers, ``"file": True`` for a path that must
   name an existing file;
2. ``Literal[...]`` values, or the keys of the field's ``PRESETS`` table, as choices;
3. the first of ``NAME_RULES`` whose pattern matches the field name;
4. by type: an ``int`` is a count (>= 1), a ``float`` a weight or size (>= 0); a ``str`` field named
   ``template`` or ``*_template`` must hold exactly one ``{}`` (where the class name goes).

Numbers must be finite; ``None`` is accepted only where the type allows it (``--set x=None``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import os
import string
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from promptkit.errors import ConfigError

T = TypeVar("T")

# Field-name patterns (fnmatch) -> allowed range, for numbers whose type alone does not say it.
NAME_RULES: tuple[tuple[str, dict[str, float]], ...] = (
    ("*seed", {"min": 0}),
    ("warmup_*", {"min": 0}),  # warm-up epochs: 0 is none
    ("*lr", {"gt": 0}),
    ("*temperature*", {"gt": 0}),
    ("alpha", {"gt": 0}),  # a Beta(alpha, alpha) parameter
    ("share", {"gt": 0, "max": 1}),
    ("percentile", {"min": 0, "max": 1}),
    ("momentum", {"min": 0, "lt": 1}),
)
TYPE_RULES: dict[type, dict[str, float]] = {int: {"min": 1}, float: {"min": 0}}
FILE_FIELDS = ("vocabulary",)  # path settings that must name an existing file

_TRUE, _FALSE, _NONE = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("none", "null")
_BOUNDS = {"min": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "max": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def parse_pairs(pairs: Iterable[str], flag: str, metavar: str = "KEY=VALUE",
                empty_values: bool = False) -> dict[str, str]:
    """``KEY=VALUE`` strings of a repeatable flag -> {KEY: VALUE}, both strings (typing comes later).

    Refuses a pair without ``=``, an empty key, an empty value (unless ``empty_values``) and a key given twice,
    which would otherwise silently replace the first.
    """
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key or (not value and not empty_values):
            raise ConfigError(f"{flag} expects {metavar}, got {pair!r}")
        if key in parsed:
            raise ConfigError(f"{flag} {key}= is given twice ({parsed[key]!r} and {value!r}); give it once")
        parsed[key] = value
    return parsed



def resolve_config(config_cls: type[T], overrides: Mapping[str, Any] | None = None) -> T:
    """A method's config: the paper defaults, then the presets that its choice fields select, then ``overrides``.

    A config class may declare ``PRESETS = {field: {value: {other_field: value, ...}}}``: choosing that value (by
    default or in ``overrides``) sets those fields, e.g. ``compat="official-code"`` sets the released code's
    learning rates. The user's ``overrides`` are applied last, so an explicit setting always wins.
    """
    overrides = dict(overrides or {})
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    for choice_field, table in getattr(config_cls, "PRESETS", {}).items():
        choice = overrides.get(choice_field, defaults[choice_field])
        if choice not in table:
            raise ConfigError(f"{choice_field} must be one of {', '.join(map(str, table))}, got {choice!r}")
        values.update(table[choice])
    values.update(overrides)
    return config_cls(**values)

def apply_settings(config_cls: type[T], settings: Mapping[str, Any], *, method: str | None = None,
                   flag: str = "--set", prefix: str = "") -> T:
    """The config of ``config_cls`` with ``settings`` applied: strings (from the command line) are parsed to
    the field's type, Python values are type-checked; every value is range-checked before the config is built.

    ``method`` names the method in messages (default: the class name); ``flag`` and ``prefix`` spell the
    setting as the user typed it (``--set coop.epochs=ten`` for compare: ``prefix="coop."``).
    """
    owner = method or config_cls.__name__
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, value in settings.items():
        shown = f"{flag} {prefix}{key}={value}"
        if key not in fields:
            raise ConfigError(f"{shown}: {owner} has no setting {key!r}; its settings: {', '.join(fields)}")
        try:
            values[key] = _check(fields[key], hints[key], value, config_cls)
        except ConfigError as error:
            raise ConfigError(f"{shown}: {owner}'s {key} {error}") from None
    try:
        return resolve_config(config_cls, values)
    except ValueError as error:  # the config's own cross-field checks (__post_init__, presets)
        shown = " ".join(f"{flag} {prefix}{k}={v}" for k, v in settings.items()) or f"{owner}'s defaults"
        raise ConfigError(f"{shown}: {error}") from None


def _check(field: dataclasses.Field, hint: Any, value: Any, config_cls: type) -> Any:
    """``value`` as the field's type, within its allowed values; ConfigError saying what is allowed."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    optional = type(None) in kinds
    kinds = tuple(k for k in kinds if k is not type(None))
    if len(kinds) != 1:
        raise ConfigError(f"has type {hint} and cannot be set with a flag")
    kind = kinds[0]
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if not optional:
            raise ConfigError("cannot be None")
        return None
    choices = _choices(field, kind, config_cls)
    if typing.get_origin(kind) is typing.Literal:
        kind = type(choices[0])
    typed = _coerce(kind, value)
    if choices is not None and typed not in choices:
        raise ConfigError(f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    if kind in (int, float):
        _check_range(field, kind, typed)
    if kind is str:
        _check_text(field, typed)
    return typed


def _coerce(kind: type, value: Any) -> Any:
    """``value`` (a command-line string or a Python value) as ``kind``."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"takes true or false, got {value!r}")
    if kind in (int, float):
        numbers = (int,) if kind is int else (int, float)
        if isinstance(value, numbers) and not isinstance(value, bool):
            return kind(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return kind(value)
        raise ConfigError(f"takes {'a whole number' if kind is int else 'a number'}, got {value!r}")
    if kind is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ConfigError(f"takes text, got {value!r}")
    raise ConfigError(f"has type {getattr(kind, '__name__', kind)} and cannot be set with a flag")


def _choices(field: dataclasses.Field, kind: Any, config_cls: type) -> tuple | None:
    if "choices" in field.metadata:
        return tuple(field.metadata["choices"])
    if typing.get_origin(kind) is typing.Literal:
        return typing.get_args(kind)
    presets = getattr(config_cls, "PRESETS", {})
    return tuple(presets[field.name]) if field.name in presets else None


def _bounds(field: dataclasses.Field, kind: type) -> dict[str, float]:
    own = {k: v for k, v in field.metadata.items() if k in _BOUNDS}
    if own:
        return own
    for pattern, bounds in NAME_RULES:
        if fnmatch.fnmatchcase(field.name, pattern):
            return bounds
    return TYPE_RULES[kind]


def _check_range(field: dataclasses.Field, kind: type, value: float) -> None:
    bounds = _bounds(field, kind)
    if not math.isfinite(value) or not all(_BOUNDS[k][1](value, b) for k, b in bounds.items()):
        raise ConfigError(f"must be {_describe(bounds)}, got {value!r}")


def _describe(bounds: dict[str, float]) -> str:
    return " and ".join(f"{_BOUNDS[k][0]} {b}" for k, b in bounds.items())


def _check_text(field: dataclasses.Field, value: str) -> None:
    if fnmatch.fnmatchcase(field.name, "*template"):
        try:
            slots = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                     if name is not None]
        except ValueError as error:
            raise ConfigError(f"is malformed ({error}), got {value!r}") from None
        if slots != [("", "", None)]:
            raise ConfigError(f"must hold exactly one '{{}}' (where the class name goes), got {value!r}")
    if (field.metadata.get("file") or field.name in FILE_FIELDS) and not Path(value).expanduser().is_file():
        raise ConfigError(f"must name an existing file, got {value!r}")
