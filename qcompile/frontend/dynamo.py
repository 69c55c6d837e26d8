"""Normalise the graph Dynamo hands a backend into a QGraph (the torch.compile front door's capture).

See :mod:`qcompile.frontend.compile_backend` for the whole story; this module holds the graph surgery: weight
placeholders → frozen ``get_attr`` constants, SymInt sizes → ``sym_size`` of their tensor, module
scalars baked in, then ``torch.export`` and the tail :func:`qcompile.frontend.capture.qgraph_from_exported`
shared with :func:`qcompile.frontend.capture`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim

from qcompile.frontend.capture import CaptureError, qgraph_from_exported
from qcompile.ir import QGraph

log = logging.getLogger(__name__)


# ---- Dynamo graph -> QGraph ----------------------------------------------------------------------


@dataclasses.dataclass
class DynamoCapture:
    """A Dynamo graph in QGraph form: the QGraph takes ``[args[i] for i in input_indices]``."""

    qgraph: QGraph
    input_indices: tuple[int, ...]
    constants: dict[str, str]  # get_attr target -> the Dynamo placeholder it replaced
    scalars: dict[str, float | int]  # Dynamo placeholder -> the module number baked in its place


# Dynamo's source names for weights, e.g. L['self']._modules['fc']._parameters['weight'].
_STATE_KEY = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")
# The root of an nn_module_stack path: L['self'], L['args'][0], G['model'], ...
_PATH_ROOT = re.compile(r"^[LG]\[[^\]]*\](?:\[\d+\])*\.?")


def _source_name(node: fx.Node) -> str:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return ""
    name = source.name
    try:
        return str(name() if callable(name) else name)
    except Exception:  # a source without a printable name: fall back to the placeholder name
        return ""


def _is_weight(node: fx.Node, example: Any) -> bool:
    """A placeholder fed by a parameter or buffer of the compiled module.

    An ``nn.Parameter`` always is. Otherwise Dynamo's source for the placeholder decides
    (``..._buffers['inv_freq']``); only without a source does the placeholder's name
    (``..._buffers_inv_freq_``), which a user's variable name could imitate.
    """
    if isinstance(example, torch.nn.Parameter):
        return True
    source = _source_name(node)
    if source:
        return "._parameters[" in source or "._buffers[" in source
    return "_parameters_" in node.name or "_buffers_" in node.name


def _weight_path(node: fx.Node) -> str:
    """``model.layers.0.mlp.up_proj.weight`` from Dynamo's source (empty if it cannot be read)."""
    keys = _STATE_KEY.findall(_source_name(node))
    return ".".join(keys)


def _register_constant(root: fx.GraphModule, path: str, fallback: str, value: torch.Tensor) -> str:
    """Register ``value`` as a buffer at ``path`` (creating empty container modules on the way).

    The dotted path gives the constant the same name capture gives it. Where that would collide
    with an attribute ``root`` already has (a GraphModule owns ``graph``, ``code``, ...), the flat
    ``fallback`` name is used instead.
    """
    parts = path.split(".") if path else []
    if parts and all(p.isidentifier() or p.isdigit() for p in parts):
        owner: torch.nn.Module = root
        ok = True
        for part in parts[:-1]:
            child = owner._modules.get(part)
            if child is None:
                if hasattr(owner, part):
                    ok = False
                    break
                child = torch.nn.Module()
                owner.add_module(part, child)
            elif type(child) is not torch.nn.Module:  # not a container we created
                ok = False
                break
            owner = child
        if ok and not hasattr(owner, parts[-1]):
            owner.register_buffer(parts[-1], value, persistent=True)
            return path
    name, i = fallback, 0
    while hasattr(root, name):
        i += 1
        name = f"{fallback}_{i}"
    root.register_buffer(name, value, persistent=True)
    return name


def hint_int(value: Any) -> int:
    """The concrete value behind a SymInt example input, read without adding a guard to Dynamo's graph."""
    from torch.fx.experimental import symbolic_shapes as ss

    for fn_name in ("guarding_hint_or_throw", "hint_int"):
        fn = getattr(ss, fn_name, None)
        if fn is not None:
            return int(fn(value))
    return int(value.node.hint)  # pragma: no cover - older torch


def _dynamic_dims(node: fx.Node) -> dict[int, Any] | None:
    """The dims Dynamo made symbolic in this input (read from its fake example value), for export.

    The QGraph is exactly as general as Dynamo's graph: a static Dynamo graph (the first compile)
    gives a static QGraph, like ``capture(dynamic=False)``; after a recompile for a new shape the
    changed dims are symbolic, like ``capture``'s default. ``Dim.AUTO``, not ``DYNAMIC``: with
    ``torch.compile(dynamic=True)`` Dynamo marks every dim symbolic, also those the code pins (a KV
    cache's head count and head size, read from the config), which ``DYNAMIC`` would turn into an
    export error; ``AUTO`` lets export keep those static, as Dynamo's own guards do (a call with
    another size fails Dynamo's guards and recompiles; the exported module checks its inputs too).
    """
    fake = node.meta.get("example_value")
    if not isinstance(fake, torch.Tensor):
        return None
    dims = {d: Dim.AUTO for d, size in enumerate(fake.shape) if isinstance(size, torch.SymInt)}
    return dims or None


def _size_placeholders(
    placeholders: list[fx.Node], example_inputs: Sequence[Any]
) -> dict[fx.Node, tuple[fx.Node, int]]:
    """SymInt placeholders that are ``t.size(d)`` of a user tensor placeholder ``t`` -> ``(t, d)``.

    Dynamo says so in each placeholder's source (``TensorPropertySource(base, SIZE, d)``).
    """
    by_source: dict[str, fx.Node] = {}
    for node, example in zip(placeholders, example_inputs, strict=True):
        name = _source_name(node)
        if name and isinstance(example, torch.Tensor) and not _is_weight(node, example):
            by_source[name] = node
    out: dict[fx.Node, tuple[fx.Node, int]] = {}
    for node, example in zip(placeholders, example_inputs, strict=True):
        if not isinstance(example, torch.SymInt | int) or isinstance(example, bool):
            continue
        source = getattr(node.meta.get("grapharg"), "source", None)
        prop, idx, base = (getattr(source, a, None) for a in ("prop", "idx", "base"))
        if getattr(prop, "name", None) != "SIZE" or not isinstance(idx, int) or base is None:
            continue
        base_name = base.name() if callable(base.name) else base.name
        tensor_node = by_source.get(str(base_name))
        if tensor_node is not None:
            out[node] = (tensor_node, idx)
    return out


def _is_module_scalar(node: fx.Node, example: Any) -> bool:
    """A Python float/int of module state (``self.scaling``) that Dynamo passes as a 0-dim tensor.

    ``torch.compile(dynamic=True)`` does this for floats it does not specialise. Such a number reached
    through an attribute is module state, frozen like the weights (SDPA's ``scale``, a norm's ``eps``
    must be concrete for export anyway); a bare local (a float argument of ``forward``) stays an input.
    """
    arg = node.meta.get("grapharg")
    if not getattr(arg, "pass_arg_as_tensor", False) or not isinstance(example, torch.Tensor):
        return False
    return example.dim() == 0 and "." in _source_name(node)


_ITEM_TARGETS = ("item",)


def _bake_scalar(
    root: fx.GraphModule, graph: fx.Graph, node: fx.Node, example: torch.Tensor, name: str
) -> str | None:
    """Replace a scalar-as-tensor placeholder by its value: ``.item()`` uses get the Python number,
    any other use a frozen 0-dim constant (whose target is returned)."""
    value = example.item()
    for user in list(node.users):
        is_item = (user.op == "call_method" and user.target in _ITEM_TARGETS) or (
            user.op == "call_function"
            and user.target in (torch.Tensor.item, torch.ops.aten._local_scalar_dense.default)
        )
        if is_item:
            for use in list(user.users):
                use.args = fx.node.map_arg(use.args, lambda n, u=user: value if n is u else n)
                use.kwargs = fx.node.map_arg(use.kwargs, lambda n, u=user: value if n is u else n)
            graph.erase_node(user)
    if node.users:
        target = _register_constant(root, "", name, example.detach().clone())
        with graph.inserting_before(node):
            attr = graph.get_attr(target)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        return target
    graph.erase_node(node)
    return None


def _privatize_state(gm: fx.GraphModule) -> None:
    """Replace modules and tensors the copied graph reaches through ``call_module``/``get_attr``
    (Dynamo shares them with the caller when nn modules are not inlined) by private copies."""
    for name, child in list(gm.named_children()):
        setattr(gm, name, copy.deepcopy(child))
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        *path, leaf = str(node.target).split(".")
        owner: Any = gm
        for part in path:
            owner = getattr(owner, part)
        value = getattr(owner, leaf)
        if isinstance(value, torch.Tensor):
            fresh = value.detach().clone()
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(fresh, requires_grad=False)
            elif leaf in owner._buffers:
                owner._buffers[leaf] = fresh
            else:
                setattr(owner, leaf, fresh)


def capture_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> DynamoCapture:
    """Normalise the graph Dynamo hands a backend into a QGraph (see the module docstring).

    ``gm`` and the example inputs are only read: the weights are frozen as copies.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise CaptureError(
            f"torch.compile backend: Dynamo's graph has {len(placeholders)} placeholders but "
            f"{len(example_inputs)} example inputs"
        )

    # Work on a copy of the graph: Dynamo's own GraphModule stays as it was handed over.
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    work = fx.GraphModule(gm, graph)
    _privatize_state(work)

    sizes = _size_placeholders(placeholders, example_inputs)
    last_placeholder = value_map[placeholders[-1]] if placeholders else None

    user_args: list[Any] = []
    dynamic: list[Any] = []
    input_indices: list[int] = []
    constants: dict[str, str] = {}
    scalars: dict[str, float | int] = {}
    for i, (node, example) in enumerate(zip(placeholders, example_inputs, strict=True)):
        copied = value_map[node]
        if node in sizes:
            # A symbolic size Dynamo passes alongside its tensor: read it off the tensor instead, as
            # capture's graphs do (``aten.sym_size.int``), so the QGraph takes the tensors only.
            tensor_node, dim = sizes[node]
            with graph.inserting_after(last_placeholder):
                size = graph.call_function(torch.ops.aten.sym_size.int, (value_map[tensor_node], dim))
            copied.replace_all_uses_with(size)
            graph.erase_node(copied)
        elif _is_module_scalar(node, example):
            target = _bake_scalar(work, graph, copied, example, f"_qc_{node.name}")
            scalars[node.name] = example.item()
            if target is not None:
                constants[target] = node.name
        elif isinstance(example, torch.Tensor) and _is_weight(node, example):
            if torch._subclasses.fake_tensor.is_fake(example):
                raise CaptureError(
                    f"torch.compile backend: weight {node.name!r} arrived as a fake tensor; qcompile "
                    "needs the real weights (it cannot run under torch.export or fake-mode tracing)"
                )
            frozen = example.detach().clone()
            target = _register_constant(work, _weight_path(node), f"_qc_{node.name}", frozen)
            with graph.inserting_before(copied):
                attr = graph.get_attr(target)
            copied.replace_all_uses_with(attr)
            graph.erase_node(copied)
            constants[target] = node.name
        elif isinstance(example, torch.Tensor):
            # A new tensor object: export marks its inputs' dims (``_dynamo_*_indices``), which must
            # not land on the caller's tensor, where Dynamo's guards check for them.
            user_args.append(example.detach())
            dynamic.append(_dynamic_dims(node))
            input_indices.append(i)
        elif isinstance(example, torch.SymInt | int):
            user_args.append(hint_int(example))
            dynamic.append(Dim.DYNAMIC if isinstance(example, torch.SymInt) else None)
            input_indices.append(i)
        else:
            raise CaptureError(
                f"torch.compile backend: graph input {node.name!r} is a {type(example).__name__}; "
                "qcompile handles tensors and integer sizes"
            )
    graph.lint()
    work.recompile()
    # A freshly built GraphModule's forward has named parameters, so positional dynamic shapes bind.
    module_names = {t: t.rsplit(".", 1)[0] if "." in t else "" for t in constants}
    try:
        # Outside Dynamo's tracing and compile contexts: export would otherwise add the guards of its
        # own shape environment to the frame Dynamo is compiling (guards on names only export knows).
        with torch._guards.tracing(None), torch._guards.compile_context(None), torch.no_grad():
            exported = torch.export.export(
                work, tuple(user_args), dynamic_shapes=tuple(dynamic), strict=False
            )
            exported = exported.run_decompositions({})
    except Exception as exc:  # torch.export raises many types; name the step and the way out
        raise CaptureError(
            f"torch.compile backend: torch.export of Dynamo's graph failed: {type(exc).__name__}: {exc}\n"
            "Try torch.compile(..., dynamic=False), or qcompile.capture(model, example_inputs)."
        ) from exc
    mutated = dict(exported.graph_signature.buffers_to_mutate)
    if mutated:
        raise CaptureError(
            "torch.compile backend: the graph writes to module buffers "
            f"({', '.join(sorted(mutated.values()))}); qcompile compiles inference graphs with frozen "
            "weights. Call model.eval() before torch.compile."
        )
    _clean_module_stacks(exported.graph_module)
    qgraph = qgraph_from_exported(exported, source="torch.compile", module_names=module_names)
    _check_inference(qgraph)
    return DynamoCapture(qgraph, tuple(input_indices), constants, scalars)


def _clean_module_stacks(gm: fx.GraphModule) -> None:
    """Dynamo's module paths (``L['self'].model.layers.0``) in capture's form (``model.layers.0``)."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (_PATH_ROOT.sub("", path), cls) for k, (path, cls) in stack.items()
            }


_DROPOUT_OPS = {
    torch.ops.aten.dropout.default,
    torch.ops.aten.native_dropout.default,
    torch.ops.aten.feature_dropout.default,
    torch.ops.aten.alpha_dropout.default,
    torch.ops.aten.feature_alpha_dropout.default,
}


def _check_inference(qgraph: QGraph) -> None:
    """Refuse training-mode graphs: random dropout would make every pass's numbers meaningless."""
    for node in qgraph.graph.nodes:
        if node.op == "call_function" and node.target in _DROPOUT_OPS:
            p, train = node.args[1], node.args[2]
            if train and p:
                raise CaptureError(
                    f"torch.compile backend: node {qgraph.display_name(node)} is dropout in training "
                    f"mode (p={p}); qcompile compiles for inference. Call model.eval() before torch.compile."
                )
