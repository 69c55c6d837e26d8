"""The pass contract (after ``torch.fx.passes.infra``): a small object with a name, preconditions and
postconditions as facts about the graph (:mod:`qcompile.pipeline.facts`), and ``run(ir, ctx) ->
PassResult`` carrying an explicit ``changed`` flag and a structured report the instruments render.

Kinds:
- ``analysis``: annotates ``node.meta["qcompile"]`` / ``qgraph.info``; changes no numbers.
- ``equivalence``: rewrites constants or nodes and must leave float outputs unchanged within
  ``tolerance`` (max relative error of every graph output); the equivalence instrument checks it.
- ``quantize``: changes numbers on purpose; reports per-linear error (SQNR) instead.
- ``lowering``: changes the representation (folding, packing, fusing, translating to another IR)
  but not the quantized numbers.

The IR a pass reads is usually a :class:`~qcompile.ir.QGraph`; a lowering may hand the next passes
another IR (the ONNX backend's model), which only has to offer ``copy()`` and ``print_readable()``
(and ``run_flat`` for the equivalence check).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from qcompile.errors import PassError
from qcompile.ir import QGraph
from qcompile.pipeline.facts import Fact
from qcompile.pipeline.options import OptionError, build_options, describe_field, fields_with_hints

__all__ = [
    "PASS_REGISTRY",
    "Pass",
    "PassContext",
    "PassError",
    "PassKind",
    "PassResult",
    "PipelineResult",
    "get_pass_class",
    "register_pass",
]

PassKind = Literal["analysis", "equivalence", "quantize", "lowering"]


@dataclass
class PassResult:
    """What a pass hands back: the IR (usually the same QGraph, changed in place), whether it changed,
    a JSON-able structured report (what changed, where, by how much) and a one-paragraph summary."""

    ir: Any
    changed: bool
    report: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    @property
    def qgraph(self) -> QGraph:
        """The IR, when it is a QGraph (every pass but those after a translation to another IR)."""
        if not isinstance(self.ir, QGraph):
            raise TypeError(f"this pass result holds a {type(self.ir).__name__}, not a QGraph; use .ir")
        return self.ir


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
    # Results passes hand to later passes (e.g. calibration statistics); keys in qcompile.ir.keys.
    state: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True


@dataclass
class PipelineResult:
    """The outcome of a pipeline: the final IR and every pass's result, in order."""

    ir: Any
    results: list[tuple[str, PassResult]]
    total_seconds: float
    # The pass after which an instrument (e.g. StopAfter) ended the pipeline, and what did not run.
    stopped_after: str | None = None
    skipped: list[str] = field(default_factory=list)
    # Passes an instrument (DisablePasses) kept from running.
    disabled: list[str] = field(default_factory=list)

    @property
    def qgraph(self) -> QGraph:
        if not isinstance(self.ir, QGraph):
            raise TypeError(f"the pipeline ended with a {type(self.ir).__name__}, not a QGraph; use .ir")
        return self.ir

    @property
    def stopped_early(self) -> bool:
        return self.stopped_after is not None and bool(self.skipped)

    @property
    def changed(self) -> bool:
        return any(r.changed for _, r in self.results)

    def result(self, pass_name: str) -> PassResult:
        """The result of the last run of ``pass_name``."""
        for name, res in reversed(self.results):
            if name == pass_name:
                return res
        raise KeyError(f"no pass {pass_name!r} ran; ran: {', '.join(n for n, _ in self.results)}")

    def summary(self) -> str:
        """One line per pass: name, changed or not, the pass's own summary."""
        width = max([20, *(len(name) for name, _ in self.results)])
        lines = [
            f"{name:<{width}} {'changed' if r.changed else 'unchanged':<9}  {r.summary}"
            for name, r in self.results
        ]
        if self.disabled:
            lines.append(f"disabled: {', '.join(self.disabled)}")
        if self.stopped_early:
            lines.append(f"stopped after {self.stopped_after}; not run: {', '.join(self.skipped)}")
        lines.append(f"total {self.total_seconds:.3f} s")
        return "\n".join(lines)


class Pass:
    """Base class. Subclasses set ``name``/``kind`` and implement :meth:`run`.

    Contract (facts, :mod:`qcompile.pipeline.facts`): ``requires`` must hold before the pass runs
    (:meth:`check_requires` turns a missing one into a :class:`PassError` before the pass touches the
    graph), ``ensures`` holds after it, ``invalidates`` may no longer hold after it. Passes whose
    contract depends on their options override :meth:`required_facts` / :meth:`ensured_facts` /
    :meth:`invalidated_facts`.

    Options are a dataclass the pass declares as ``Options`` (defaults and docstrings in one place, so
    recipes are validated against it and the CLI can list them)::

        @register_pass
        class Smooth(Pass):
            name = "smooth"
            kind = "equivalence"
            requires = (facts.STRUCTURE, facts.CALIBRATION)
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
    requires: ClassVar[tuple[Fact, ...]] = ()
    ensures: ClassVar[tuple[Fact, ...]] = ()
    invalidates: ClassVar[tuple[Fact, ...]] = ()
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
                names = ", ".join(sorted(options)) if isinstance(options, Mapping) else repr(options)
                raise PassError(cls.name, f"takes no options, got: {names}")
            return None
        if isinstance(options, cls.Options):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise PassError(
                cls.name, f"options must be a dict or {cls.__name__}.Options, got {type(options).__name__}"
            )
        try:
            return build_options(cls.Options, dict(options or {}), "")
        except OptionError as exc:
            raise PassError(cls.name, str(exc)) from None

    @classmethod
    def describe_options(cls) -> str:
        """One line per option: ``name: type = default`` (for errors, the CLI and docs)."""
        if cls.Options is None:
            return "(no options)"
        return "\n".join(describe_field(f, hints) for f, hints in fields_with_hints(cls.Options))

    # ---- the contract ---------------------------------------------------------------------------------

    def required_facts(self) -> tuple[Fact, ...]:
        return self.requires

    def ensured_facts(self) -> tuple[Fact, ...]:
        return self.ensures

    def invalidated_facts(self) -> tuple[Fact, ...]:
        return self.invalidates

    def needs_calibration(self) -> bool:
        """Whether this pass (with its options) reads calibration batches (``ctx.calibration``)."""
        return self.uses_calibration

    def check_requires(self, ir: Any, ctx: PassContext) -> None:
        """Raise :class:`PassError` naming the first required fact that does not hold, and why."""
        for fact in self.required_facts():
            why = fact.why_not(ir, ctx)
            if why is not None:
                raise PassError(self.name, f"requires {fact.description}, but {why}{_establish_hint(fact)}")

    def check_ensures(self, ir: Any, ctx: PassContext) -> None:
        """Raise :class:`PassError` when the pass did not establish what it promises (a pass bug)."""
        for fact in self.ensured_facts():
            why = fact.why_not(ir, ctx)
            if why is not None:
                raise PassError(self.name, f"promised {fact.description}, but after it ran {why}")

    def run(self, ir: Any, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, ir: Any, ctx: PassContext | None = None) -> PassResult:
        """Run the pass alone: preconditions checked, no instruments (the pass manager adds those)."""
        ctx = ctx if ctx is not None else PassContext()
        self.check_requires(ir, ctx)
        return self.run(ir, ctx)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


def _establish_hint(fact: Fact) -> str:
    from qcompile.pipeline.facts import establishing_passes

    passes = establishing_passes(fact)
    return f"; run {' or '.join(passes)} before it" if passes else ""


# The documented pass registry: name -> class. Filled by ``register_pass`` in each passes/ module and
# by backends for their target passes (named ``<backend>.<pass>``).
PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls


def import_builtin_passes() -> None:
    """Import ``qcompile.passes`` (each module registers its pass)."""
    import qcompile.passes  # noqa: F401


def get_pass_class(name: str) -> type[Pass]:
    """The registered pass ``name``; a backend's pass (``onnx.<pass>``) imports that backend first."""
    import_builtin_passes()
    if name not in PASS_REGISTRY and "." in name:
        import importlib

        backend = name.split(".", 1)[0]
        try:
            importlib.import_module(f"qcompile.backends.{backend}")
        except ImportError:
            pass
    try:
        return PASS_REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(sorted(PASS_REGISTRY))}") from None
