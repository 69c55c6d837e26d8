"""Pass options: a dict (from a recipe) checked against the pass's ``Options`` dataclass, with errors
that name the key and list the valid ones ("did you mean …")."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union


class OptionError(ValueError):
    """An option dict does not fit the dataclass; the message names the key and the valid ones."""


def fields_with_hints(options_cls: type) -> list[tuple[dataclasses.Field, Any]]:
    if not dataclasses.is_dataclass(options_cls):
        raise TypeError(f"{options_cls.__qualname__} must be a dataclass to serve as pass Options")
    hints = typing.get_type_hints(options_cls)  # resolves string annotations (``from __future__``)
    return [(f, hints.get(f.name, Any)) for f in dataclasses.fields(options_cls) if f.init]


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def describe_field(f: dataclasses.Field, tp: Any) -> str:
    if f.default is not dataclasses.MISSING:
        default = f" = {f.default!r}"
    elif f.default_factory is not dataclasses.MISSING:
        default = f" = {f.default_factory()!r}"
    else:
        default = " (required)"
    return f"{f.name}: {_type_name(tp)}{default}"


def build_options(options_cls: type, values: dict[str, Any], prefix: str) -> Any:
    fields = fields_with_hints(options_cls)
    known = {f.name: tp for f, tp in fields}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = "; ".join(describe_field(f, tp) for f, tp in fields) or "(none)"
        hint = difflib.get_close_matches(unknown[0], list(known), n=1)
        did_you_mean = f" (did you mean {prefix + hint[0]!r}?)" if hint else ""
        raise OptionError(
            f"unknown option(s) {', '.join(prefix + k for k in unknown)}{did_you_mean}; valid options: {valid}"
        )
    missing = [
        f.name
        for f, _ in fields
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise OptionError(f"missing required option(s) {', '.join(prefix + k for k in missing)}")
    converted = {k: coerce_option(v, known[k], prefix + k) for k, v in values.items()}
    try:
        return options_cls(**converted)
    except (TypeError, ValueError) as exc:  # a __post_init__ check of the Options class
        raise OptionError(f"invalid options {converted}: {exc}") from exc


def coerce_option(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp``; TOML-friendly coercions: int -> float, list -> tuple,
    table -> nested Options dataclass. Unknown typing constructs are accepted as they are."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = OptionError(f"option {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        for arg in args:
            try:
                return coerce_option(value, arg, key)
            except OptionError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise OptionError(f"option {key} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is int or tp is str or tp is bool:
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise bad
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return build_options(tp, dict(value), key + ".")
        raise bad
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise bad
            return tuple(
                coerce_option(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [coerce_option(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise bad
        ktp, vtp = args if args else (Any, Any)
        return {coerce_option(k, ktp, key): coerce_option(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad
    return value
