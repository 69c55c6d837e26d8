"""What the building blocks of a model look like in qcompile's ATen IR — defined once, used by every pass.

Never compare op names as strings elsewhere: ask these predicates and matchers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

LINEAR_OPS = {aten.linear.default}
EMBEDDING_OPS = {aten.embedding.default}
ADD_OPS = {aten.add.Tensor}
MUL_OPS = {aten.mul.Tensor}
LAYER_NORM_OPS = {aten.layer_norm.default}
RMS_NORM_OPS = {aten.rms_norm.default} if hasattr(aten, "rms_norm") else set()
SDPA_OPS = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}
ACTIVATION_OPS = {
    aten.silu.default: "silu",
    aten.gelu.default: "gelu",
    aten.relu.default: "relu",
    aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid",
}
# Elementwise arithmetic an activation written out by hand is made of (GPT-2's tanh-GELU:
# 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))).
ELEMENTWISE_OPS = set(ACTIVATION_OPS) | {
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.neg.default,
    aten.pow.Tensor_Scalar,
    aten.erf.default,
    aten.exp.default,
}
# Reshapes: relabel the same row-major elements.
RESHAPE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# What a broadcast operand (a mask, a position vector) may pass through without its values changing.
BROADCAST_OPS = {aten.unsqueeze.default, aten.expand.default, aten.clone.default, aten.alias.default}
# Reshapes and broadcasts: what transformers' ``repeat_kv`` and position vectors are written with.
LAYOUT_OPS = RESHAPE_OPS | BROADCAST_OPS
# Ops that move or relabel data without changing values (no copy semantics that matter to us).
VIEW_OPS = LAYOUT_OPS | {aten.contiguous.default, aten.squeeze.dim, aten.detach.default}
# View ops that also permute dimensions (they keep values but may move the channel dim).
PERMUTE_OPS = {aten.transpose.int, aten.permute.default, aten.t.default}
# Ops that RoPE is written with (between the q/k projections and attention).
ROPE_OPS = {aten.mul.Tensor, aten.add.Tensor, aten.cat.default, aten.neg.default, aten.slice.Tensor}
CAST_OPS = {aten._to_copy.default}


def is_op(node: object, ops: set | dict) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops


def is_constant(node: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def is_linear(node: object) -> bool:
    """An ``aten.linear`` whose weight (and bias, if any) are constants."""
    if not is_op(node, LINEAR_OPS):
        return False
    args = node.args  # type: ignore[union-attr]
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")  # type: ignore[union-attr]
    return is_constant(args[1]) and (bias is None or is_constant(bias))


# Products with a weight-shaped operand that are not (yet) an ``aten.linear``: capture rewrites the
# ``mm`` / ``addmm`` linear layers (qcompile.frontend.linear_forms); what is left is reported.
MATMUL_OPS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.matmul.default,
    aten.baddbmm.default,
}


def is_unrecognised_linear(node: object) -> bool:
    """A matrix product with a constant operand of rank >= 2 that is not an ``aten.linear``: a
    linear layer in a form the compiler does not quantize (it stays float, and passes say so)."""
    if not is_op(node, MATMUL_OPS):
        return False
    return any(
        is_constant(a) and len(val_shape(a)) >= 2
        for a in node.args  # type: ignore[union-attr]
        if isinstance(a, fx.Node)
    )


def linear_bias(node: fx.Node) -> fx.Node | None:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def is_full_slice(node: fx.Node) -> bool:
    """``x[:, :]`` style slices that select everything (transformers' ``logits_to_keep=0``)."""
    if not is_op(node, {aten.slice.Tensor}):
        return False
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2**62))


def is_row_slice(node: fx.Node) -> bool:
    """A slice along a dim other than the last: it keeps some rows (tokens, batch entries) and every
    channel of them untouched, e.g. ``hidden[:, -1:]`` before lm_head (``logits_to_keep=1``)."""
    if not is_op(node, {aten.slice.Tensor}):
        return False
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return isinstance(dim, int) and dim % val.dim() != val.dim() - 1


def is_online_transform(node: object) -> bool:
    """An online orthogonal op a rotation inserted (``qcompile::hadamard``): it changes values but
    not the block structure, so role finding looks through it."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return False
    target = node.target
    return (
        isinstance(target, torch._ops.OpOverload)
        and target.namespace == "qcompile"
        and (target._schema.name.split("::")[-1] == "hadamard")
    )


def skip_online_transforms_back(node: fx.Node) -> fx.Node:
    """Walk up through value-preserving views and online rotations to the producing node."""
    node = skip_passthrough_back(node)
    while is_online_transform(node):
        node = skip_passthrough_back(node.args[0])
    return node


def is_passthrough(node: fx.Node) -> bool:
    """Ops that neither change values nor move the last (channel) dimension (row slices keep a subset
    of rows with every channel unchanged)."""
    return is_op(node, VIEW_OPS | CAST_OPS) or is_full_slice(node) or is_row_slice(node)


def skip_passthrough_back(node: fx.Node) -> fx.Node:
    """Walk up through value-preserving view ops to the node that produced the data."""
    while isinstance(node, fx.Node) and is_passthrough(node):
        node = node.args[0]
    return node


def passthrough_users(node: fx.Node) -> list[fx.Node]:
    """The real consumers of ``node``: users, looking through value-preserving view ops."""
    out: list[fx.Node] = []
    for user in node.users:
        if is_passthrough(user) and user.args and user.args[0] is node:
            out.extend(passthrough_users(user))
        else:
            out.append(user)
    return out


def val_shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


@dataclass
class NormMatch:
    kind: str  # "rms_norm" | "layer_norm"
    input: fx.Node
    output: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    nodes: list[fx.Node]


def match_layer_norm(node: fx.Node) -> NormMatch | None:
    if not is_op(node, LAYER_NORM_OPS):
        return None
    x, shape = node.args[0], node.args[1]
    weight = node.args[2] if len(node.args) > 2 else None
    bias = node.args[3] if len(node.args) > 3 else None
    eps = node.args[4] if len(node.args) > 4 else 1e-5
    if len(shape) != 1:
        return None
    return NormMatch("layer_norm", x, node, weight, bias, float(eps), [node])


def match_rms_norm(rsqrt: fx.Node) -> NormMatch | None:
    """Match transformers' decomposed RMSNorm from its ``rsqrt`` node.

    ``x·rsqrt(mean(x², -1, keepdim) + eps)``, optionally with casts around ``x`` and the result,
    optionally times a 1-D constant γ (either operand order).
    """
    if not is_op(rsqrt, {aten.rsqrt.default}):
        return None
    add = rsqrt.args[0]
    if not is_op(add, ADD_OPS) or not isinstance(add.args[1], float | int):
        return None
    mean = add.args[0]
    if not is_op(mean, {aten.mean.dim}) or list(mean.args[1]) not in ([-1],) or not _keepdim(mean):
        return None
    pow_ = mean.args[0]
    if not is_op(pow_, {aten.pow.Tensor_Scalar}) or pow_.args[1] != 2:
        return None
    x = pow_.args[0]
    scaled = next((u for u in rsqrt.users if is_op(u, MUL_OPS) and rsqrt in u.args), None)
    if scaled is None:
        return None
    other = scaled.args[0] if scaled.args[1] is rsqrt else scaled.args[1]
    if other is not x:
        return None
    nodes = [pow_, mean, add, rsqrt, scaled]
    out = scaled
    if len(out.users) == 1 and is_op(next(iter(out.users)), CAST_OPS):
        out = next(iter(out.users))
        nodes.append(out)
    weight = None
    if len(out.users) == 1:
        user = next(iter(out.users))
        if is_op(user, MUL_OPS):
            w = user.args[0] if user.args[1] is out else user.args[1]
            if is_constant(w) and len(val_shape(w)) == 1:
                weight, out = w, user
                nodes.append(user)
    source = x.args[0] if is_op(x, CAST_OPS) else x
    return NormMatch("rms_norm", source, out, weight, None, float(add.args[1]), nodes)


def _keepdim(mean: fx.Node) -> bool:
    return bool(mean.args[2]) if len(mean.args) > 2 else bool(mean.kwargs.get("keepdim", False))


def find_norms(graph: fx.Graph) -> list[NormMatch]:
    """Every RMSNorm (decomposed or ``aten.rms_norm``) and LayerNorm over the last dim, in graph order."""
    found: list[NormMatch] = []
    for node in graph.nodes:
        match = match_layer_norm(node) or match_rms_norm(node)
        if match is None and is_op(node, RMS_NORM_OPS):
            x, _, w, eps = (list(node.args) + [None, None])[:4]
            match = NormMatch("rms_norm", x, node, w, None, float(eps or 1e-6), [node])
        if match is not None:
            found.append(match)
    return found
