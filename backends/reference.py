"""The reference backend: run a QGraph in plain torch, on any device.

This is the ground truth the Triton and ONNX backends are measured against, so it does nothing
clever: it moves a private copy of the graph to the device and calls it. Custom qcompile ops run
through their torch reference implementations.

Moving is more than moving constants: a graph traced on one device has that device baked into some
calls (``aten.arange(..., device=cpu)``, ``aten.to.device(x, cpu)``), so those arguments are
rewritten too. The caller's QGraph is never touched.

Target ``reference`` (``qcompile.lower(quantized, target="reference")``) folds the Q/DQ graph
(``fold_qdq``: packed weights and the ``qcompile::qlinear_*`` ops, whose references compute exactly
what the unfolded graph did) and returns a :class:`ReferenceRunner` on the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from qcompile.ir import QGraph
from qcompile.pipeline.contract import PipelineResult
from qcompile.pipeline.recipe import PassSpec
from qcompile.pipeline.targets import Target, register_target

__all__ = ["REFERENCE_TARGET", "ReferenceOptions", "ReferenceRunner", "run"]


def _retarget_devices(graph: fx.Graph, src: torch.device, dst: torch.device) -> None:
    """Point every device argument of ``src``'s type at ``dst`` (``cpu`` -> ``cuda:0``, ...)."""

    def swap(a: Any) -> Any:
        if isinstance(a, torch.device) and a.type == src.type:
            return dst
        return a

    for node in graph.nodes:
        if node.op == "call_function":
            node.args = fx.node.map_aggregate(node.args, swap)
            node.kwargs = fx.node.map_aggregate(node.kwargs, swap)


class ReferenceRunner:
    """A QGraph ready to run on ``device``: ``ReferenceRunner(qgraph, "cuda")(*inputs)``.

    Inputs are moved to the device; outputs come back in the captured module's output structure
    (e.g. a transformers ``ModelOutput``), on the device. ``device=None`` runs where the QGraph's
    constants already are, without a copy.
    """

    def __init__(self, qgraph: QGraph, device: torch.device | str | None = None) -> None:
        if not isinstance(qgraph, QGraph):
            raise TypeError(f"ReferenceRunner: expected a QGraph, got {type(qgraph).__name__}")
        src = qgraph.device
        self.device = torch.device(device) if device is not None else src
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pipeline: PipelineResult | None = None  # the lowering that made the graph, if any
        if self.device == src:
            self.qgraph = qgraph
        else:
            self.qgraph = qgraph.copy().to(self.device)
            _retarget_devices(self.qgraph.graph, src, self.device)
            self.qgraph.recompile()

    def _to_device(self, x: Any) -> Any:
        return x.to(self.device) if isinstance(x, torch.Tensor) else x

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = pytree.tree_map(self._to_device, (args, kwargs))
        return self.qgraph(*args, **kwargs)

    def __repr__(self) -> str:
        return f"ReferenceRunner({self.qgraph!r}, device={self.device})"


def run(qgraph: QGraph, *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> Any:
    """Run ``qgraph`` once on ``device`` (see :class:`ReferenceRunner`); for repeated calls, keep a runner."""
    return ReferenceRunner(qgraph, device)(*args, **kwargs)


@dataclass
class ReferenceOptions:
    """Target ``reference``: where the lowered graph runs."""

    device: str | None = None  # None: where the graph's constants are


def _plan(options: ReferenceOptions, decode_step: bool) -> list[PassSpec]:
    return [PassSpec("fold_qdq")]


def _runner(ir: QGraph, pipeline: PipelineResult, options: ReferenceOptions) -> ReferenceRunner:
    runner = ReferenceRunner(ir, options.device)
    runner.pipeline = pipeline
    return runner


REFERENCE_TARGET = register_target(Target("reference", ("fold_qdq",), ReferenceOptions, _plan, _runner))
