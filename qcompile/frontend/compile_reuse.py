"""Reusing a symbolic compiled graph for a graph Dynamo specialised from the same code.

Dynamo recompiles a frame for every new specialisation: the first shape (static), the first new
shape (symbolic sizes), and on top of that sizes 0 and 1 (batch 1, a one-token decode step), which
it always specialises. Each would otherwise cost a capture, the whole recipe and an Inductor compile.
When the weights and options are the same and the new graph is the *same tensor program* as one
whose compiled product is symbolic, that product already serves the new graph's inputs.

"Same tensor program" is checked on Dynamo's graphs, op by op: the tensor-valued nodes, in order,
call the same targets with the same arguments, where a size the earlier graph holds symbolically
may be any size (symbolic or a number) in the new one — every other argument (a dim, a float, a
dtype, a flag) must be equal. Sizes are what specialisation changes; a different branch taken, a
different constant, an extra op makes the graphs differ and the new one compiles on its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

_SYM = "sym"


def _value(node: fx.Node) -> Any:
    return node.meta.get("example_value")


def _is_size(value: Any) -> bool:
    return isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool | int | float) and not isinstance(
        value, bool
    )


def _tensor_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Call / get_attr nodes whose value is a tensor or a tuple of them (the tensor program)."""
    out = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        value = _value(node)
        if isinstance(value, torch.Tensor) or (
            isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
        ):
            out.append(node)
    return out


class _Numbering:
    """Tensor nodes and placeholders by position, so two graphs' arguments compare by role."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.ids: dict[fx.Node, tuple[str, int]] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tensor_placeholders = [n for n in placeholders if isinstance(_value(n), torch.Tensor)]
        for i, node in enumerate(tensor_placeholders):
            self.ids[node] = ("input", i)
        for i, node in enumerate(_tensor_nodes(gm)):
            self.ids[node] = ("node", i)

    def leaf(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in self.ids:
                return self.ids[a]
            value = _value(a)
            if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
                return _SYM
            if isinstance(value, int | float | bool):  # a size computation Dynamo left in the graph
                return _SYM if _is_size(value) else ("const", value)
            return ("other", a.op, str(a.target))
        if isinstance(a, (list, tuple)):
            return tuple(self.leaf(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, self.leaf(v)) for k, v in a.items()))
        if isinstance(a, slice):
            return ("slice", self.leaf(a.start), self.leaf(a.stop), self.leaf(a.step))
        return ("const", a)


def _covers(general: Any, special: Any) -> bool:
    """Does an argument of the symbolic graph cover the new graph's argument?"""
    if general == _SYM:
        return special == _SYM or (
            isinstance(special, tuple) and special[:1] == ("const",) and _is_size(special[1])
        )
    if isinstance(general, tuple) and isinstance(special, tuple):
        if general[:1] == ("const",) or special[:1] == ("const",):
            return general == special
        return len(general) == len(special) and all(
            _covers(g, s) for g, s in zip(general, special, strict=True)
        )
    return general == special


def _signature(numbering: _Numbering, node: fx.Node) -> tuple[Any, Any, Any, Any]:
    return (node.op, str(node.target), numbering.leaf(tuple(node.args)), numbering.leaf(dict(node.kwargs)))


def generalizes(general: fx.GraphModule, special: fx.GraphModule) -> bool:
    """True when ``special`` is the tensor program of ``general`` with some symbolic sizes fixed."""
    g_nodes, s_nodes = _tensor_nodes(general), _tensor_nodes(special)
    if len(g_nodes) != len(s_nodes):
        return False
    g_num, s_num = _Numbering(general), _Numbering(special)
    for g, s in zip(g_nodes, s_nodes, strict=True):
        g_sig, s_sig = _signature(g_num, g), _signature(s_num, s)
        if g_sig[:2] != s_sig[:2] or not _covers(g_sig[2:], s_sig[2:]):
            return False
    g_out = next(n for n in reversed(general.graph.nodes) if n.op == "output")
    s_out = next(n for n in reversed(special.graph.nodes) if n.op == "output")
    if not _covers(g_num.leaf(g_out.args), s_num.leaf(s_out.args)):
        return False
    return _input_kinds(general) == _input_kinds(special)


def _input_kinds(gm: fx.GraphModule) -> list[tuple[Any, int]]:
    """dtype and rank of each tensor placeholder, in order."""
    out = []
    for node in gm.graph.nodes:
        value = _value(node) if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor):
            out.append((value.dtype, value.dim()))
    return out


def user_tensor_indices(gm: fx.GraphModule, weight_indices: list[int]) -> list[int]:
    """Positions of the tensor placeholders that are not weights (what a product's QGraph takes)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = set(weight_indices)
    return [i for i, n in enumerate(placeholders) if i not in weights and isinstance(_value(n), torch.Tensor)]
