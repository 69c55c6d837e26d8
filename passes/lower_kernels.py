"""``lower_kernels``: replace each folded qcompile op by the fastest kernel registered for the device.

After ``fold_qdq`` a quantized graph computes its linears with ``qcompile::qlinear_w`` /
``qlinear_wa`` (and QuaRot's online rotations with ``qcompile::hadamard``), whose torch references
unpack and dequantize the weight on every call — right for checking, slow for running. A kernel
backend registers a :class:`qcompile.ops.registry.KernelImpl` per op (``register_impl(backend, op,
impl)``); this pass asks it, per call, whether it handles that call (``supports(args, device)``)
and, when it does, repacks the constants once (``prepare``) and replaces the call by the kernel's op.
Any call a kernel refuses keeps its reference implementation, and the report says why, per node.

The backend follows the graph's device (where its constants live): CUDA → ``"triton"``, CPU →
``"cpu"`` (option ``backend`` overrides it; ``"reference"`` lowers nothing). The backend's module,
``qcompile.backends.<backend>``, is imported on first use; one that fails to import (Triton missing,
no GPU) leaves every call on its reference and the report says so — the graph still runs.

Numbers: a kernel may compute differently from the reference (the CPU kernels take bfloat16
activations); the kind is ``lowering`` and the change is measured as a perplexity delta in the
README, not hidden.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.ir import QGraph, keys
from qcompile.ops import HADAMARD, QLINEAR_W, QLINEAR_WA
from qcompile.ops.registry import REFERENCE, KernelImpl, implementation, op_name
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass

LOWERABLE = (QLINEAR_W, QLINEAR_WA, HADAMARD)
AUTO = "auto"


def backend_for(device: torch.device) -> str:
    """The kernel backend for a device: CUDA → ``"triton"``, anything else → ``"cpu"``."""
    return "triton" if device.type == "cuda" else "cpu"


def load_backend(backend: str) -> str | None:
    """Import ``qcompile.backends.<backend>`` (its ``__init__`` registers its kernels); None, or why the
    import failed (the calls then keep their reference implementations)."""
    if backend == REFERENCE:
        return None
    try:
        importlib.import_module(f"qcompile.backends.{backend}")
    except Exception as exc:  # Triton without a GPU, a missing extra, ...: keep the references
        return f"qcompile.backends.{backend} failed to import ({type(exc).__name__}: {exc})"
    return None


def call_args(qgraph: QGraph, node: fx.Node) -> dict[str, Any]:
    """A registry-op call's arguments by schema name: constants as tensors, runtime inputs as fx
    nodes, ints / bools / None as themselves (what ``KernelImpl.supports`` / ``prepare`` read)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            value = node.args[i]
        elif arg.name in node.kwargs:
            value = node.kwargs[arg.name]
        else:
            value = arg.default_value if arg.has_default_value() else None
        if isinstance(value, fx.Node) and value.op == "get_attr":
            value = qgraph.get_constant(value)
        out[arg.name] = value
    return out


@register_pass
class LowerKernels(Pass):
    """Replace qlinear / hadamard calls by the device's kernels (see the module docstring)."""

    name: ClassVar[str] = "lower_kernels"
    kind = "lowering"
    requires = (facts.FOLDED,)
    ensures = (facts.KERNELS_LOWERED,)

    @dataclass
    class Options:
        backend: str = "auto"  # auto: from the graph's device (cuda → triton, cpu → cpu); or a name

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        device = qgraph.device
        backend = backend_for(device) if self.options.backend == AUTO else self.options.backend
        import_problem = load_backend(backend)
        chosen: dict[str, dict[str, Any]] = {}
        constants: dict[int, tuple[torch.Tensor, fx.Node]] = {}  # id(tensor) -> (it, its get_attr)
        for node in list(qgraph.graph.nodes):
            if node.op != "call_function" or node.target not in LOWERABLE:
                continue
            op = op_name(node.target)
            impl, why = self._impl(backend, op, import_problem)
            if impl is not None:
                args = call_args(qgraph, node)
                why = impl.supports(args, device)
            if why is not None:
                chosen[node.name] = {"op": op, "kernel": None, "reason": why}
                continue
            new = self._replace(qgraph, node, impl, args, constants)
            chosen[new.name] = {"op": op, "kernel": f"{backend}: {new.target}", "from": node.name}
        qgraph.graph.eliminate_dead_code()
        qgraph.drop_unused_constants()
        qgraph.recompile()
        qgraph.info[keys.INFO_KERNELS] = chosen
        lowered = sum(1 for c in chosen.values() if c["kernel"])
        reasons: dict[str, int] = {}
        for c in chosen.values():
            if not c["kernel"]:
                reasons[f"{c['op']}: {c['reason']}"] = reasons.get(f"{c['op']}: {c['reason']}", 0) + 1
        report = {
            "backend": backend,
            "device": str(device),
            "lowered": lowered,
            "kept": reasons,
            "nodes": chosen,
        }
        kept = "; ".join(f"{n} × {r}" for r, n in sorted(reasons.items())) or "none"
        summary = f"backend {backend} on {device}: {lowered} of {len(chosen)} calls lowered; kept the reference: {kept}"
        return PassResult(qgraph, changed=lowered > 0, report=report, summary=summary)

    @staticmethod
    def _impl(backend: str, op: str, import_problem: str | None) -> tuple[KernelImpl | None, str | None]:
        if backend == REFERENCE:
            return None, "lowering backend 'reference' (the op's own torch implementation)"
        if import_problem is not None:
            return None, import_problem
        try:
            impl = implementation(backend, op)
        except KeyError as exc:
            return None, str(exc.args[0])
        if not isinstance(impl, KernelImpl):
            return None, f"backend {backend!r}'s {op} is a {type(impl).__name__}, not a KernelImpl"
        return impl, None

    def _replace(
        self,
        qgraph: QGraph,
        node: fx.Node,
        impl: KernelImpl,
        args: dict[str, Any],
        constants: dict[int, tuple[torch.Tensor, fx.Node]],
    ) -> fx.Node:
        try:
            kwargs = impl.prepare(args)
        except Exception as exc:
            raise PassError(
                self.name, f"{impl.op}'s prepare failed: {type(exc).__name__}: {exc}", node.name
            ) from exc
        values = []
        for arg in impl.op._schema.arguments:
            if arg.name in kwargs:
                value = kwargs[arg.name]
            elif arg.has_default_value():
                value = arg.default_value
            else:
                raise PassError(self.name, f"{impl.op}'s prepare gave no {arg.name!r}", node.name)
            if isinstance(value, torch.Tensor):
                value = self._constant(qgraph, node, arg.name, value, constants)
            values.append(value)
        new = qgraph.insert_call(impl.op, tuple(values), before=node, like=node)
        new.meta[keys.NAMESPACE] = {**keys.get(node), **keys.get(new)}
        node.replace_all_uses_with(new)
        qgraph.graph.erase_node(node)
        return new

    @staticmethod
    def _constant(
        qgraph: QGraph,
        node: fx.Node,
        name: str,
        value: torch.Tensor,
        constants: dict[int, tuple[torch.Tensor, fx.Node]],
    ) -> fx.Node:
        """A get_attr for a prepared tensor: the graph's own constant when prepare passed it through,
        else a new one (one per tensor object, so a weight two calls share is stored once)."""
        for attr in node.all_input_nodes:
            if attr.op == "get_attr" and qgraph.get_constant(attr) is value:
                return attr
        if id(value) not in constants:  # the tensor is kept with its node, so its id stays unique
            constants[id(value)] = (value, qgraph.add_constant(f"{node.name}_{name}", value))
        return constants[id(value)][1]
