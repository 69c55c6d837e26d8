"""Every linear form becomes one ``aten.linear``: the normal form every pass and lowering reads.

Models write a linear layer in several ways, and ``torch.export`` keeps them apart:

- ``nn.Linear`` / ``F.linear``: ``aten.linear(x, W[out, in], b)`` — the normal form;
- GPT-2's ``Conv1D`` (and hand-written layers): ``addmm(b, x2d, W[in, out])`` on a flattened input,
  or ``mm(x2d, W[in, out])`` without a bias; ``x @ W`` with a 2-D constant: ``matmul(x, W[in, out])``;
- ``x @ W.t()`` with ``W[out, in]``: ``mm(x2d, t(W))``, ``addmm(b, x2d, t(W))``, ``matmul(x, t(W))``.

:func:`canonicalize_linears` rewrites the last two into ``aten.linear`` while capture normalises the
graph (both front doors), so the analysis, the passes and the lowerings know one form. A weight stored
``[in, out]`` is transposed once into a contiguous ``[out, in]`` constant; when the addmm/mm is the
only reader of that constant, the constant itself is replaced (same name), otherwise a new constant
``<name>_linear`` is added and the original keeps its other readers. The rewrite is the same
function: ``addmm(b, x, W) = x @ W + b = linear(x, Wᵀ, b)``, the same products; only the order in
which the BLAS sums them may change with the weight's layout, so float32 outputs agree to rounding
(tests/test_linear_forms.py: within K·eps of float32 on a hand-written model, bit for bit on GPT-2).

:func:`split_fused_linears` then cuts a fused projection (one linear whose output is only split along
its last dim: GPT-2's ``c_attn`` into q, k, v; a fused gate/up) into one linear per chunk, so every
projection has a role of its own.

Left alone (they are not a linear layer, or not one with constant parameters): ``addmm`` with
``beta`` / ``alpha`` other than 1, a bias that is not a constant vector of ``out`` elements, a weight
that is computed rather than stored, and ``bmm`` / batched matmuls.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from qcompile.analysis.patterns import RESHAPE_OPS
from qcompile.ir.qgraph import resolve_attr, set_buffer

aten = torch.ops.aten

_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = resolve_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor):
            return value
    return None


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        dims = sorted(d % 2 for d in node.args[1:3])
        return dims == [0, 1]
    return node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]


def _weight_out_in(gm: fx.GraphModule, mat2: Any) -> tuple[str, fx.Node] | None:
    """How ``mat2`` (the ``[in, out]`` operand of mm/addmm) gives an ``[out, in]`` weight:
    ``("direct", W)`` when it is ``t(W)`` of a constant ``W[out, in]``, ``("transpose", W)`` when it is
    a constant ``[in, out]`` itself; None when it is not a stored weight."""
    if not isinstance(mat2, fx.Node):
        return None
    if mat2.op == "call_function" and mat2.target in _TRANSPOSES and _is_2d_transpose(mat2):
        src = mat2.args[0]
        value = _constant(gm, src)
        if value is not None and value.dim() == 2:
            return "direct", src
        return None
    value = _constant(gm, mat2)
    if value is not None and value.dim() == 2:
        return "transpose", mat2
    return None


def _transposed_weight(gm: fx.GraphModule, weight: fx.Node, readers: set[fx.Node]) -> fx.Node:
    """A get_attr of ``weight``'s constant transposed to ``[out, in]``, contiguous: the constant is
    replaced in place when ``readers`` are all its users, else a new constant is added."""
    value = resolve_attr(gm, str(weight.target))
    transposed = value.detach().t().contiguous()
    if set(weight.users) <= readers:
        set_buffer(gm, str(weight.target), transposed)
        weight.meta["val"] = transposed.to("meta")
        return weight
    return _new_constant(gm, weight, f"{weight.target}_linear", transposed)


def _mat2_and_bias(node: fx.Node) -> tuple[Any, Any] | None:
    """``(mat2, bias)`` of an ``mm`` / 2-D-or-more ``matmul`` / plain ``addmm`` (None for anything else)."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default:
        return node.args[1], None
    if node.target is aten.matmul.default:
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        return (node.args[1], None) if val is not None and val.dim() >= 2 else None  # 1-D: a vector product
    if (
        node.target is aten.addmm.default
        and node.kwargs.get("beta", 1) == 1
        and node.kwargs.get("alpha", 1) == 1
    ):
        return node.args[2], node.args[0]
    return None


def canonicalize_linears(gm: fx.GraphModule) -> int:
    """Rewrite every ``mm`` / ``addmm`` / ``matmul`` that is a linear layer with constant parameters into
    ``aten.linear`` (module docstring); returns how many. In place on ``gm`` (capture's private copy)."""
    graph = gm.graph
    # every product that is a linear layer; those reading an [in, out] constant grouped by that
    # constant (to replace it in place when they are its only readers)
    plans: list[tuple[fx.Node, str, fx.Node, fx.Node | None]] = []
    readers: dict[fx.Node, set[fx.Node]] = {}
    for node in graph.nodes:
        operands = _mat2_and_bias(node)
        form = _weight_out_in(gm, operands[0]) if operands is not None else None
        if form is None:
            continue
        bias = operands[1]
        kind, weight = form
        out_features = resolve_attr(gm, str(weight.target)).shape[0 if kind == "direct" else 1]
        if bias is not None:
            b = _constant(gm, bias)
            if b is None or b.dim() != 1 or b.shape[0] != out_features:
                continue
        plans.append((node, kind, weight, bias))
        if kind == "transpose":
            readers.setdefault(weight, set()).add(node)
    transposed: dict[fx.Node, fx.Node] = {}
    for node, kind, weight, bias in plans:
        if kind == "transpose":
            if weight not in transposed:
                transposed[weight] = _transposed_weight(gm, weight, readers[weight])
            w = transposed[weight]
        else:
            w = weight
        x = node.args[1] if node.target is aten.addmm.default else node.args[0]  # as rewritten so far
        args = (x, w) if bias is None else (x, w, bias)
        with graph.inserting_before(node):
            linear = graph.call_function(aten.linear.default, args)
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    return len(plans)


# ---- fused projections ---------------------------------------------------------------------------

_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def _chunk_sizes(split: fx.Node, width: int) -> list[int] | None:
    """The widths ``split`` cuts its input's last dim into (None: not along the last dim)."""
    val = split.args[0].meta.get("val")
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if val is None or dim % val.dim() != val.dim() - 1:
        return None
    if split.target is aten.split_with_sizes.default:
        sizes = list(split.args[1])
    else:
        size = split.args[1]
        sizes = [min(size, width - o) for o in range(0, width, size)]
    return sizes if all(isinstance(s, int) for s in sizes) and sum(sizes) == width else None


def _fused_linear_plan(
    gm: fx.GraphModule, linear: fx.Node
) -> tuple[list[fx.Node], fx.Node, list[int]] | None:
    """``linear`` -> views keeping the last dim -> one split of the last dim into its ``getitem`` s: the
    view chain, the split and the chunk widths; None for any other shape of graph."""
    weight = linear.args[1]
    w = _constant(gm, weight)
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if w is None or w.dim() != 2 or (bias is not None and _constant(gm, bias) is None):
        return None
    width, chain, node = w.shape[0], [], linear
    while len(node.users) == 1:
        (user,) = node.users
        if user.target in RESHAPE_OPS and user.args[1][-1] in (width, -1):
            chain.append(user)
            node = user
            continue
        if user.target in _SPLITS:
            sizes = _chunk_sizes(user, width)
            if sizes is None or len(sizes) < 2:
                return None
            if not all(u.target is operator.getitem for u in user.users):
                return None
            return chain, user, sizes
        return None
    return None


def split_fused_linears(gm: fx.GraphModule) -> int:
    """Cut every linear whose output is only split along its last dim (GPT-2's ``c_attn`` q/k/v, fused
    gate/up) into one linear per chunk — rows of the weight and bias — so each projection is a linear
    of its own to the analysis and the passes. Exact: each output element is the same dot product.
    Returns how many fused linears were cut. In place on ``gm`` (capture's private copy)."""
    graph, count = gm.graph, 0
    for linear in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.linear.default]:
        plan = _fused_linear_plan(gm, linear)
        if plan is None:
            continue
        chain, split, sizes = plan
        x, weight = linear.args[0], linear.args[1]
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        w, b = _constant(gm, weight), _constant(gm, bias) if bias is not None else None
        outs: dict[int, fx.Node] = {}
        offset = 0
        for i, size in enumerate(sizes):
            rows = slice(offset, offset + size)
            offset += size
            w_node = _new_constant(gm, weight, f"{weight.target}_split{i}", w.detach()[rows].contiguous())
            args: tuple = (x, w_node)
            if b is not None:
                args += (_new_constant(gm, bias, f"{bias.target}_split{i}", b.detach()[rows].contiguous()),)
            with graph.inserting_before(split):
                cur = graph.call_function(aten.linear.default, args)
                cur.meta = dict(linear.meta)
                cur.meta["val"] = _narrowed(linear.meta["val"], size)
                for view in chain:
                    shape = list(view.args[1])
                    shape[-1] = size if shape[-1] != -1 else -1
                    nxt = graph.call_function(view.target, (cur, shape))
                    nxt.meta = dict(view.meta)
                    nxt.meta["val"] = _narrowed(view.meta["val"], size)
                    cur = nxt
            outs[i] = cur
        for item in list(split.users):
            item.replace_all_uses_with(outs[item.args[1]])
            graph.erase_node(item)
        for node in [split, *reversed(chain), linear]:
            graph.erase_node(node)
        count += 1
    graph.eliminate_dead_code()
    return count


def _new_constant(gm: fx.GraphModule, anchor: fx.Node, target: str, value: torch.Tensor) -> fx.Node:
    set_buffer(gm, target, value)
    with gm.graph.inserting_after(anchor):
        node = gm.graph.get_attr(target)
    node.meta["val"] = value.to("meta")
    return node


def _narrowed(val: Any, size: int) -> Any:
    """``val`` (a FakeTensor) with its last dim ``size``: the metadata of one chunk's output."""
    return val.new_empty((*val.shape[:-1], size))
