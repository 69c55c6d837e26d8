"""What the ``torch.compile`` backend does to a captured graph after the recipe: lowering and Inductor.

``options["lowering"]`` (see :class:`qcompile.frontend.compile_backend.BackendOptions`):

- ``"kernels"`` (default): ``fold_qdq`` (packed weights, ``qcompile::qlinear_*`` ops) →
  ``lower_kernels`` (each op replaced by the device's kernel where one supports the call: CPU →
  torch's packed int4 / int8 GEMMs, CUDA → the Triton kernels) → Inductor
  (``torch._inductor.compile_fx.compile_fx``), which fuses norms, RoPE, attention and the kernels'
  casts as it would for a float model;
- ``"reference"``: ``fold_qdq`` only, and the graph runs through the ops' torch references (no
  Inductor): the ground truth, for debugging a kernel;
- ``"none"``: the recipe's graph as it is (Q/DQ ops, no folding), no Inductor.

``options["inductor"] = False`` keeps the lowered graph out of Inductor (runs it as an fx
GraphModule). The lowering passes run in the same pass manager machinery as the recipe's (so
``QCOMPILE_DUMP_DIR``, ``DisablePasses`` and the IR verifier see them) but in their own run: the
recipe's result is what is cached and shared (:mod:`qcompile.frontend.compile_backend`).

Inductor is handed the QGraph's GraphModule with the placeholders' fake values (export's, with its
symbolic sizes) as example inputs, outside Dynamo's tracing context — the graph is already a frozen,
functional ATen program, so Inductor compiles it once for every size the QGraph accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from qcompile.ir import QGraph

log = logging.getLogger(__name__)

LOWERINGS = ("kernels", "reference", "none")


def lowering_passes(lowering: str, qgraph: QGraph) -> list[str]:
    """The pass names a lowering runs on ``qgraph`` (``fold_qdq`` only when there is Q/DQ to fold)."""
    from qcompile.ops import DEQUANTIZE

    if lowering == "none":
        return []
    has_qdq = any(n.op == "call_function" and n.target is DEQUANTIZE for n in qgraph.graph.nodes)
    passes = ["fold_qdq"] if has_qdq else []
    if lowering == "kernels":
        passes.append("lower_kernels")
    return passes


def lower(qgraph: QGraph, lowering: str, instruments: Sequence[Any] | None) -> tuple[QGraph, Any]:
    """Run the lowering passes on a copy of ``qgraph``; returns ``(lowered QGraph, PipelineResult or
    None)``. With nothing to fold and no kernels (float recipe), the graph comes back unchanged."""
    names = lowering_passes(lowering, qgraph)
    if names == ["lower_kernels"] and not _has_kernel_ops(qgraph):
        names = []
    if not names:
        return qgraph, None
    from qcompile.pipeline.contract import PassContext
    from qcompile.pipeline.manager import PassManager
    from qcompile.pipeline.recipe import PassSpec

    pm = PassManager([PassSpec(n).build() for n in names], instruments or ())
    result = pm.run(qgraph, PassContext(show_progress=False))
    return result.qgraph, result


def _has_kernel_ops(qgraph: QGraph) -> bool:
    from qcompile.passes.lower_kernels import LOWERABLE

    return any(n.op == "call_function" and n.target in LOWERABLE for n in qgraph.graph.nodes)


def inductor_runner(qgraph: QGraph) -> Callable[[list[Any]], Any]:
    """``qgraph``'s GraphModule compiled by Inductor: flat inputs -> flat outputs.

    Example inputs are the placeholders' fake values (symbolic where the QGraph is dynamic), so one
    compiled artifact serves every shape the QGraph does. Runs outside Dynamo's tracing and compile
    contexts (we are called from inside a Dynamo backend), like the capture's ``torch.export``.
    """
    from torch._inductor.compile_fx import compile_fx

    gm = qgraph.graph_module
    fakes = [_contiguous_fake(n.meta["val"]) for n in gm.graph.nodes if n.op == "placeholder"]
    with torch._guards.tracing(None), torch._guards.compile_context(None), torch.no_grad():
        compiled = compile_fx(gm, fakes)

    def run(flat: list[Any]) -> Any:
        # Inductor's code asserts the strides it was compiled for; a KV cache's layout changes between
        # steps (the first holds the transposed prefill keys, later ones a concatenation), so the
        # graph is compiled for contiguous inputs and gets them (a no-op for contiguous ones).
        flat = [x.contiguous() if isinstance(x, torch.Tensor) else x for x in flat]
        with torch.no_grad():
            return compiled(*flat)

    return run


def _contiguous_fake(val: Any) -> Any:
    """A contiguous fake tensor of ``val``'s shape (symbolic sizes kept), in ``val``'s fake mode."""
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return val
    with val.fake_mode:
        return torch.empty(val.shape, dtype=val.dtype, device=val.device)


def eager_runner(qgraph: QGraph) -> Callable[[list[Any]], Any]:
    """The QGraph's own GraphModule (ops run eagerly): flat inputs -> flat outputs."""
    return qgraph.run_flat
