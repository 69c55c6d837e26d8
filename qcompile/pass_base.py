"""The pass contract (after ``torch.fx.passes.infra``): a small object with a name, preconditions as
code, and ``run(qgraph, ctx) -> PassResult`` carrying an explicit ``changed`` flag and a structured
report that the debugging instruments render.

Kinds:
- ``analysis``: annotates ``node.meta["qcompile"]`` / ``qgraph.info``; changes no numbers.
- ``equivalence``: rewrites constants or nodes and must leave float outputs unchanged within
  ``tolerance`` (max relative error of every graph output); the equivalence instrument checks it.
- ``quantize``: changes numbers on purpose; reports per-linear error (SQNR) instead.
- ``lowering``: changes the representation (folding, packing) but not the quantized numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from qcompile.ir import QGraph

PassKind = Literal["analysis", "equivalence", "quantize", "lowering"]


class PassError(RuntimeError):
    """A pass refused or failed. The message names the pass, the node and the reason."""

    def __init__(self, pass_name: str, message: str, node: str | None = None) -> None:
        self.pass_name = pass_name
        self.node = node
        where = f" at node `{node}`" if node else ""
        super().__init__(f"{pass_name}{where}: {message}")


@dataclass
class PassResult:
    qgraph: QGraph
    changed: bool
    # JSON-able, structured: what changed, where, by how much. Rendered by instruments and the CLI.
    report: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


@dataclass
class PassContext:
    """What a pass may read besides the graph. Nothing global: options come from the recipe."""

    # Example inputs (each a tuple of positional args) the graph can be run on: equivalence checks,
    # calibration, error reports.
    sample_inputs: list[tuple] = field(default_factory=list)
    # Calibration batches (each a tuple of positional args), e.g. token windows of wiki.valid.tokens.
    calibration: list[tuple] | None = None
    seed: int = 0
    device: str = "cpu"
    # Names of the passes that already ran in this pipeline, in order.
    completed: list[str] = field(default_factory=list)
    # Results passes hand to later passes (e.g. calibration statistics), keyed by producer.
    state: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True


class Pass:
    """Base class. Subclasses set ``name``/``kind`` and implement :meth:`run`.

    ``requires`` lists pass names that must have run earlier in the same pipeline; ``check_requires``
    turns a missing one into a :class:`PassError` before the pass touches the graph.

    Options are a dataclass the pass declares as ``Options`` (defaults and docstrings in one place, so
    recipes are validated against it and the CLI can list them)::

        @register_pass
        class Smooth(Pass):
            name = "smooth"
            kind = "equivalence"
            tolerance = 1e-4

            @dataclass
            class Options:
                alpha: float = 0.5  # migration strength, SmoothQuant eq. 4

    ``Smooth({"alpha": 0.8})`` validates the dict (unknown key or wrong type -> :class:`PassError`
    naming the valid options) and stores ``self.options``. An ``Options`` field named ``tolerance``
    (when not None) overrides the class ``tolerance``, so a recipe can loosen or tighten the check.
    Subclasses that define ``__init__`` must call ``super().__init__(options)``.
    """

    name: ClassVar[str] = "unnamed"
    kind: ClassVar[PassKind] = "analysis"
    requires: ClassVar[tuple[str, ...]] = ()
    # Equivalence passes: max relative error of the float outputs this pass is allowed to cause.
    tolerance: ClassVar[float | None] = None
    # The pass's options dataclass, or None for a pass without options.
    Options: ClassVar[type | None] = None
    # The pass reads calibration batches (``ctx.calibration``): a recipe with it needs them.
    uses_calibration: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any] | Any | None = None) -> None:
        self.options = self.validate_options(options)
        override = getattr(self.options, "tolerance", None)
        if override is not None:
            self.tolerance = override  # type: ignore[misc]  (instance value shadows the ClassVar)

    @classmethod
    def validate_options(cls, options: Mapping[str, Any] | Any | None) -> Any:
        """``options`` (a dict, an ``Options`` instance or None) as an ``Options`` instance.

        Raises :class:`PassError` naming the pass, the offending key and the valid options.
        """
        if cls.Options is None:
            if options:
                keys = ", ".join(sorted(options)) if isinstance(options, Mapping) else repr(options)
                raise PassError(cls.name, f"takes no options, got: {keys}")
            return None
        if isinstance(options, cls.Options):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise PassError(
                cls.name, f"options must be a dict or {cls.__name__}.Options, got {type(options).__name__}"
            )
        try:
            return _build_options(cls.Options, dict(options or {}), "")
        except OptionError as exc:
            raise PassError(cls.name, str(exc)) from None

    @classmethod
    def describe_options(cls) -> str:
        """One line per option: ``name: type = default`` (for errors, the CLI and docs)."""
        if cls.Options is None:
            return "(no options)"
        return "\n".join(_describe_field(f, hints) for f, hints in _fields_with_hints(cls.Options))

    def check_requires(self, qgraph: QGraph, ctx: PassContext) -> None:
        missing = [r for r in self.requires if r not in ctx.completed]
        if missing:
            raise PassError(
                self.name,
                f"requires pass(es) {', '.join(missing)} to run first; add them earlier in the recipe",
            )

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, qgraph: QGraph, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        self.check_requires(qgraph, ctx)
        return self.run(qgraph, ctx)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


# The documented pass registry: name -> class. Filled by ``register_pass`` in each passes/ module.
PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls


def get_pass_class(name: str) -> type[Pass]:
    import qcompile.passes  # noqa: F401  (importing registers the built-in passes)

    try:
        return PASS_REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}") from None


# ---- options: a dict (from a recipe) checked against the pass's Options dataclass ------------------


class OptionError(ValueError):
    """An option dict does not fit the dataclass; the message names the key and the valid ones."""


def _fields_with_hints(options_cls: type) -> list[tuple[dataclasses.Field, Any]]:
    if not dataclasses.is_dataclass(options_cls):
        raise TypeError(f"{options_cls.__qualname__} must be a dataclass to serve as pass Options")
    hints = typing.get_type_hints(options_cls)  # resolves string annotations (``from __future__``)
    return [(f, hints.get(f.name, Any)) for f in dataclasses.fields(options_cls) if f.init]


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _describe_field(f: dataclasses.Field, tp: Any) -> str:
    if f.default is not dataclasses.MISSING:
        default = f" = {f.default!r}"
    elif f.default_factory is not dataclasses.MISSING:
        default = f" = {f.default_factory()!r}"
    else:
        default = " (required)"
    return f"{f.name}: {_type_name(tp)}{default}"


def _build_options(options_cls: type, values: dict[str, Any], prefix: str) -> Any:
    fields = _fields_with_hints(options_cls)
    known = {f.name: tp for f, tp in fields}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = "; ".join(_describe_field(f, tp) for f, tp in fields) or "(none)"
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
            return _build_options(tp, dict(value), key + ".")
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
