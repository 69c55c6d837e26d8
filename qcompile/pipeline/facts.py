"""Facts: the pass contract's pre- and postconditions, as predicates on the graph and the context.

A pass declares the facts it ``requires`` (checked on the real IR before it runs), the facts it
``ensures`` (checked after it ran: a pass that does not establish what it promises is a bug) and the
facts it ``invalidates`` (e.g. ``rotate`` makes calibration statistics stale). A recipe is validated
statically with the same declarations — each pass's requirements must be ensured by an earlier pass
and not invalidated since — so "smooth needs calibration statistics; add calibrate before it" is
reported before any model is loaded. Because the runtime check reads the graph, not a list of pass
names, nothing can fake a precondition (after ``torch.fx.passes.infra``'s ``requires(gm)`` /
``ensures(gm)``).

Backends add facts about their own IR (e.g. "the IR is an ONNX model") with :func:`register_fact`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qcompile.analysis import patterns
from qcompile.ir import QGraph, keys
from qcompile.ir.verify import structure_problems
from qcompile.ops import DEQUANTIZE

# (ir, ctx) -> None when the fact holds, else the reason it does not
Check = Callable[[Any, Any], "str | None"]


@dataclass(frozen=True)
class Fact:
    """A named, checkable property of the IR (or the context) between passes."""

    name: str
    description: str  # what holds, e.g. "calibration statistics of the linears' inputs"
    check: Check

    def why_not(self, ir: Any, ctx: Any) -> str | None:
        """None when the fact holds for ``ir`` / ``ctx``, else the reason."""
        return self.check(ir, ctx)

    def __repr__(self) -> str:
        return f"Fact({self.name})"


FACTS: dict[str, Fact] = {}


def register_fact(fact: Fact) -> Fact:
    if fact.name in FACTS and FACTS[fact.name] != fact:
        raise ValueError(f"fact {fact.name!r} registered twice")
    FACTS[fact.name] = fact
    return fact


# ---- the built-in facts ------------------------------------------------------------------------------


def _qgraph(ir: Any) -> str | None:
    return None if isinstance(ir, QGraph) else f"the IR is a {type(ir).__name__}, not a QGraph"


def _structure(ir: Any, ctx: Any) -> str | None:
    if (why := _qgraph(ir)) is not None:
        return why
    if ir.info.get(keys.INFO_STRUCTURE) is None:
        return "the graph has no structural analysis"
    dead = structure_problems(ir)
    return dead[0] if dead else None


def _calibration(ir: Any, ctx: Any) -> str | None:
    if ctx is not None and ctx.state.get(keys.STATE_CALIBRATION):
        return None
    # a graph calibrated in an earlier pipeline carries its statistics on the linears
    if isinstance(ir, QGraph) and any(
        keys.ACT_STATS in n.meta.get(keys.NAMESPACE, {}) for n in ir.graph.nodes
    ):
        return None
    return "there are no calibration statistics (in the context or on the graph's linears)"


def _weightless_norms(ir: Any, ctx: Any) -> str | None:
    if (why := _structure(ir, ctx)) is not None:
        return why
    st = ir.info[keys.INFO_STRUCTURE]
    if st.residual is None or st.residual.post_norm:
        return None  # no pre-norm residual stream: nothing a rotation of it would need
    scaled = [
        st.norms[r].output
        for r in st.residual.readers
        if st.norms[r].weight is not None or st.norms[r].bias is not None
    ]
    if scaled:
        return f"{len(scaled)} norm(s) on the residual stream still scale their channels (e.g. `{scaled[0]}`)"
    return None


def _decode_step(ir: Any, ctx: Any) -> str | None:
    if (why := _qgraph(ir)) is not None:
        return why
    return None if keys.INFO_DECODER in ir.info else "the graph is not a decode step with a KV cache"


def _folded(ir: Any, ctx: Any) -> str | None:
    if (why := _qgraph(ir)) is not None:
        return why
    for node in ir.graph.nodes:
        if patterns.is_op(node, patterns.LINEAR_OPS) and len(node.args) > 1:
            weight = node.args[1]
        elif patterns.is_op(node, patterns.EMBEDDING_OPS):
            weight = node.args[0]
        else:
            continue
        if patterns.is_op(weight, {DEQUANTIZE}):
            return f"`{node.name}` still reads its weight through a dequantize"
    return None


STRUCTURE = register_fact(
    Fact(
        "structure", "a structural analysis naming live nodes (linears, norms, attention, stream)", _structure
    )
)
CALIBRATION = register_fact(
    Fact("calibration", "calibration statistics of the linears' inputs in the context", _calibration)
)
WEIGHTLESS_NORMS = register_fact(
    Fact(
        "weightless_norms",
        "weightless norms on the residual stream (γ/β folded into the readers)",
        _weightless_norms,
    )
)
DECODE_STEP = register_fact(
    Fact("decode_step", "a decode-step graph with its KV cache as inputs and outputs", _decode_step)
)
FOLDED = register_fact(
    Fact("folded", "every quantized weight packed into a qlinear / qembedding op", _folded)
)


def _kernels_lowered(ir: Any, ctx: Any) -> str | None:
    if (why := _qgraph(ir)) is not None:
        return why
    chosen = ir.info.get(keys.INFO_KERNELS)
    if chosen is None:
        return "no kernel lowering recorded (qgraph.info lower_kernels)"
    live = {n.name: n for n in ir.graph.nodes if n.op == "call_function"}
    for name, choice in chosen.items():
        node = live.get(name)
        if node is None:
            return f"the lowering names `{name}`, which is not in the graph"
        in_qcompile = getattr(node.target, "namespace", "") == "qcompile"
        if choice.get("kernel") and in_qcompile:
            return f"`{name}` was lowered to {choice['kernel']} but still calls {node.target}"
    return None


KERNELS_LOWERED = register_fact(
    Fact(
        "kernels_lowered",
        "every qlinear / hadamard call a kernel backend supports replaced by that kernel (choices in "
        "qgraph.info lower_kernels)",
        _kernels_lowered,
    )
)


# ---- quantization annotations (the annotate pass) ------------------------------------------------------


def _specs_annotated(ir: Any, ctx: Any) -> str | None:
    if (why := _qgraph(ir)) is not None:
        return why
    if any(keys.QSPEC in n.meta.get(keys.NAMESPACE, {}) for n in ir.graph.nodes):
        return None
    return "no node carries a quantization spec (node.meta qcompile.qspec)"


SPECS_ANNOTATED = register_fact(
    Fact(
        "specs_annotated",
        "quantization specs annotated on the linears / embedding / KV cache entries to quantize",
        _specs_annotated,
    )
)


def establishing_passes(fact: Fact) -> list[str]:
    """Names of the registered passes that ensure ``fact`` (for error messages)."""
    from qcompile.pipeline.contract import PASS_REGISTRY, import_builtin_passes

    import_builtin_passes()
    return sorted(
        name for name, cls in PASS_REGISTRY.items() if fact in cls.ensures and fact not in cls.requires
    )


# ---- lowering (targets) ----------------------------------------------------------------------------


def _reference(ir: Any, ctx: Any) -> str | None:
    if ctx is not None and isinstance(ctx.state.get(keys.STATE_REFERENCE), QGraph):
        return None
    return "the context holds no copy of the graph before lowering (the keep_reference pass makes one)"


REFERENCE = register_fact(
    Fact("reference", "a copy of the graph before lowering in the context (keys.STATE_REFERENCE)", _reference)
)
