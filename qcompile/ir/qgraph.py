"""QGraph: the one IR every pass reads and writes.

A QGraph wraps a frozen, ATen-level ``torch.fx.GraphModule``:

- weights and buffers are ``get_attr`` constants owned by the graph module (copies: the caller's
  module is never shared or mutated), with ``requires_grad=False``;
- every node carries ``meta["val"]`` (a FakeTensor, or a meta tensor for constants) so passes know
  shapes and dtypes without running the graph;
- placeholders are the flattened user inputs; ``in_spec``/``out_spec`` (pytrees) rebuild the call
  signature and the output structure of the original module (e.g. a transformers ``ModelOutput``).

Passes change constants through :meth:`QGraph.set_constant` (which keeps ``meta["val"]`` in step)
and nodes through ``qgraph.graph`` followed by :meth:`QGraph.recompile`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from qcompile.ir import keys


def resolve_attr(module: torch.nn.Module, target: str) -> Any:
    """The object a ``get_attr`` target (``"model.layers.0.mlp.up_proj.weight"``) names in ``module``."""
    obj: Any = module
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def set_buffer(module: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Register ``value`` as the (persistent) buffer ``target`` of ``module``, replacing a parameter
    or buffer of that name: new storage, the old tensor is never written into."""
    path, _, leaf = str(target).rpartition(".")
    owner = resolve_attr(module, path) if path else module
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    owner.register_buffer(leaf, value.detach(), persistent=True)


class QGraph:
    """A captured model: a frozen ATen ``GraphModule`` plus the pytree specs of its signature."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        in_spec: pytree.TreeSpec | None = None,
        out_spec: pytree.TreeSpec | None = None,
        *,
        source: str = "torch.export",
        module_names: dict[str, str] | None = None,
    ) -> None:
        self.graph_module = graph_module
        self.in_spec = in_spec
        self.out_spec = out_spec
        self.source = source
        # get_attr target -> original module path, for display only (passes never match on it).
        self.module_names = dict(module_names or {})
        # Free-form facts recorded by passes (e.g. the analysis summary), keyed by pass name.
        self.info: dict[str, Any] = {}

    # ---- running -------------------------------------------------------------------------------

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list[Any]:
        if self.in_spec is None:
            if kwargs:
                raise TypeError("this QGraph takes positional inputs only")
            return list(args)
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            raise TypeError(
                "QGraph: inputs do not match the captured signature.\n"
                f"  captured: {self.in_spec}\n  given:    {spec}"
            )
        return flat

    def run_flat(self, flat_inputs: list[Any]) -> list[Any] | Any:
        """Run on flattened inputs; returns the graph's flat outputs (no pytree rebuild)."""
        with torch.no_grad():
            return self.graph_module(*flat_inputs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat_in = self.flatten_inputs(args, kwargs)
        flat_out = self.run_flat(flat_in)
        if self.out_spec is None:
            return flat_out
        if not isinstance(flat_out, (list, tuple)):
            flat_out = [flat_out]
        return pytree.tree_unflatten(list(flat_out), self.out_spec)

    @property
    def device(self) -> torch.device:
        """Where the constants live (CPU for a graph without constants)."""
        for t in self.graph_module.buffers():
            return t.device
        for t in self.graph_module.parameters():
            return t.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> QGraph:
        """Move every constant to ``device`` (in place on this QGraph, which owns its constants)."""
        self.graph_module.to(device)
        return self

    def copy(self) -> QGraph:
        """A deep copy: graph, constants and node.meta. Passes that must not touch their input use it."""
        gm = copy.deepcopy(self.graph_module)
        # fx copies each node.meta shallowly: give the copy its own annotation dict, so a pass writing
        # node.meta["qcompile"] on the copy never annotates the original (the values are immutable).
        originals = {n.name: n for n in self.graph.nodes}
        for node in gm.graph.nodes:
            ann = originals[node.name].meta.get(keys.NAMESPACE)
            if ann is not None:
                node.meta[keys.NAMESPACE] = dict(ann)
        new = QGraph(gm, self.in_spec, self.out_spec, source=self.source, module_names=self.module_names)
        new.info = copy.deepcopy(self.info)
        return new

    def recompile(self) -> None:
        self.graph.lint()
        self.graph_module.recompile()

    # ---- constants -----------------------------------------------------------------------------

    def get_constant(self, node_or_target: fx.Node | str) -> torch.Tensor:
        target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
        obj = resolve_attr(self.graph_module, str(target))
        if not isinstance(obj, torch.Tensor):
            raise TypeError(f"QGraph: get_attr target {target!r} is not a tensor")
        return obj

    def set_constant(self, node_or_target: fx.Node | str, value: torch.Tensor) -> None:
        """Replace a constant's tensor (new storage; never writes into the old one)."""
        target = str(node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target)
        set_buffer(self.graph_module, target, value)
        for node in self.graph.nodes:
            if node.op == "get_attr" and node.target == target:
                node.meta["val"] = value.to("meta")

    def add_constant(self, name_hint: str, value: torch.Tensor, *, before: fx.Node | None = None) -> fx.Node:
        """Register a new constant and return a get_attr node for it (inserted before ``before``)."""
        base = "_qc_" + "".join(c if c.isalnum() else "_" for c in name_hint)
        name, i = base, 0
        while hasattr(self.graph_module, name):
            i += 1
            name = f"{base}_{i}"
        self.graph_module.register_buffer(name, value.detach(), persistent=True)
        anchor = before if before is not None else next(iter(self.graph.nodes))
        with self.graph.inserting_before(anchor):
            node = self.graph.get_attr(name)
        node.meta["val"] = value.detach().to("meta")
        return node

    def drop_unused_constants(self, targets: list[str] | None = None) -> list[str]:
        """Erase ``get_attr`` nodes nothing reads (only those of ``targets`` when given) and free the
        buffer of every target no node reads any more. Returns the freed targets."""
        graph = self.graph
        dead = [
            n
            for n in graph.nodes
            if n.op == "get_attr" and not n.users and (targets is None or str(n.target) in targets)
        ]
        for node in dead:
            graph.erase_node(node)
        still_read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
        freed = []
        for target in dict.fromkeys(str(n.target) for n in dead):
            if target in still_read:
                continue
            *path, leaf = target.split(".")
            owner: Any = self.graph_module
            for part in path:
                owner = getattr(owner, part)
            owner._buffers.pop(leaf, None)
            owner._parameters.pop(leaf, None)
            freed.append(target)
        return freed

    # ---- node construction with meta["val"] ---------------------------------------------------------

    def fake_mode(self) -> FakeTensorMode:
        """The graph's own FakeTensorMode (symbolic batch/sequence dims stay symbolic), else a new one."""
        for node in self.graph.nodes:
            val = node.meta.get("val")
            if isinstance(val, FakeTensor):
                return val.fake_mode
        return FakeTensorMode(allow_non_fake_inputs=True)

    def _fake_arg(self, mode: FakeTensorMode, arg: Any) -> Any:
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._fake_arg(mode, a) for a in arg)
        if not isinstance(arg, fx.Node):
            return arg
        if arg.op == "get_attr":  # constants carry meta tensors; give the op fake ones on their device
            return mode.from_tensor(self.get_constant(arg), static_shapes=True)
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"node `{arg.name}` has no tensor meta['val']; re-capture the graph")
        return val if isinstance(val, FakeTensor) else mode.from_tensor(val, static_shapes=True)

    def insert_call(self, target: Any, args: tuple, before: fx.Node, like: fx.Node | None = None) -> fx.Node:
        """A ``call_function`` node before ``before``, its ``meta["val"]`` from the op's fake
        implementation; ``like`` lends its module path (display only) to the new node."""
        mode = self.fake_mode()
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args)
        with mode:
            node.meta["val"] = target(*self._fake_arg(mode, args))
        module = keys.get(like).get(keys.MODULE) if like is not None else None
        if module:
            keys.get(node)[keys.MODULE] = module
        return node

    def is_constant(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.op == "get_attr"

    # ---- queries -------------------------------------------------------------------------------

    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.graph.nodes)

    def node(self, name: str) -> fx.Node:
        for n in self.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(f"QGraph: no node named {name!r}")

    def display_name(self, node: fx.Node) -> str:
        """A human label: the node name plus, where known, the module it came from (display only)."""
        mod = keys.get(node).get(keys.MODULE)
        return f"{node.name} ({mod})" if mod else node.name

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.graph_module.buffers()) + sum(
            p.numel() for p in self.graph_module.parameters()
        )

    def __repr__(self) -> str:
        n_ops = sum(1 for n in self.graph.nodes if n.op == "call_function")
        return f"QGraph(source={self.source}, ops={n_ops}, constants={self.num_parameters():,} values)"

    def print_readable(self) -> str:
        """The IR as diffable text: one node per line with its op, arguments, shape and annotations."""
        from qcompile.ir.printing import format_graph

        return format_graph(self)
