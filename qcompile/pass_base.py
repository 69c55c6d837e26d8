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

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

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
    """

    name: ClassVar[str] = "unnamed"
    kind: ClassVar[PassKind] = "analysis"
    requires: ClassVar[tuple[str, ...]] = ()
    # Equivalence passes: max relative error of the float outputs this pass is allowed to cause.
    tolerance: ClassVar[float | None] = None

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
