"""Front door 1: capture an ``nn.Module`` into a QGraph with ``torch.export``.

Both front doors (this one and the ``torch.compile`` backend in :mod:`qcompile.frontend.compile_backend`)
end in :func:`normalize`, so every pass sees the same IR: ATen ops at the inference level
(``run_decompositions({})`` keeps ``aten.linear`` and ``aten.scaled_dot_product_attention`` whole),
weights frozen into ``get_attr`` constants, export's guard and metadata-assert nodes removed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from qcompile.frontend.linear_forms import canonicalize_linears, split_fused_linears
from qcompile.ir import QGraph, keys
from qcompile.ir.qgraph import resolve_attr

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """Raised when a model cannot be captured; the message says what failed and what to try."""


# Ops export leaves behind that only assert metadata; they carry no values and clutter every pass.
_ASSERT_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def prepare_module_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A private, eval-mode copy of ``model``; capture works on it so the caller's module stays untouched.

    transformers models get ``use_cache=False`` on the copy's config: the KV cache is a decode-time
    concern of the backends, not part of the captured forward.
    """
    clone = copy.deepcopy(model)
    clone.eval()
    config = getattr(clone, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _auto_dynamic_shapes(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """Dim.AUTO on every dimension of every tensor input: export keeps what it can symbolic."""

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.dim())}
        return None

    return (
        tuple(pytree.tree_map(spec, a) for a in args),
        {k: pytree.tree_map(spec, v) for k, v in kwargs.items()},
    )


def capture(
    model: torch.nn.Module,
    example_inputs: tuple | torch.Tensor,
    example_kwargs: dict | None = None,
    *,
    dynamic: bool = True,
) -> QGraph:
    """Capture ``model`` into a QGraph via ``torch.export`` (non-strict).

    Args:
        model: any ``nn.Module``; it is copied first and never modified.
        example_inputs: positional example inputs (a tensor is taken as a 1-tuple).
        example_kwargs: keyword example inputs.
        dynamic: mark every tensor dimension ``Dim.AUTO`` so the graph runs at other batch sizes and
            sequence lengths than the example's (export specialises dimensions it must).
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture: expected an nn.Module, got {type(model).__name__}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    kwargs = dict(example_kwargs or {})
    work = prepare_module_copy(model)
    names = _module_paths(work)
    if dynamic:
        args, kwargs = _widen_unit_batch(args, kwargs)
    dynamic_shapes = _auto_dynamic_shapes(args, kwargs) if dynamic else None
    if dynamic_shapes is not None and kwargs:
        names_pos = _positional_names(work, len(args))
        dynamic_shapes = {**dict(zip(names_pos, dynamic_shapes[0], strict=False)), **dynamic_shapes[1]}
    elif dynamic_shapes is not None:
        dynamic_shapes = dynamic_shapes[0]
    try:
        with torch.no_grad():
            exported = torch.export.export(work, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            exported = exported.run_decompositions({})
    except Exception as exc:  # torch.export raises many types; re-raise with the way out.
        raise CaptureError(
            f"capture: torch.export failed on {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            "Try dynamic=False, or torch.compile(model, backend='qcompile'), which tolerates graph breaks."
        ) from exc
    return qgraph_from_exported(exported, source="torch.export", module_names=names)


def qgraph_from_exported(
    exported: torch.export.ExportedProgram, *, source: str, module_names: dict[str, str]
) -> QGraph:
    """The tail both front doors share: unlift ``exported`` and bring it to QGraph form.

    ``capture`` and the ``torch.compile`` backend both end here, so a pass can never tell which door a
    graph came through: the same unlifting (constants become ``get_attr``), the same flat calling
    convention (pytree specs kept on the QGraph), the same :func:`normalize`.
    """
    gm = exported.module()
    in_spec = exported.call_spec.in_spec
    out_spec = exported.call_spec.out_spec
    _flatten_codegen(gm)
    normalize(gm)
    _record_module_names(gm, module_names)
    return QGraph(gm, in_spec, out_spec, source=source, module_names=module_names)


def _widen_unit_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Trace a batch of one at batch two, so the batch dimension stays symbolic.

    torch.export specialises every dimension whose example size is 0 or 1; a QGraph captured from a
    single calibration window would then refuse a batch of eight. When every tensor input has a
    leading dimension of 1, the example is repeated along it (values are unchanged per row).
    """
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if not tensors or any(t.dim() == 0 or t.shape[0] != 1 for t in tensors):
        return args, kwargs

    def widen(x: Any) -> Any:
        return torch.cat([x, x], dim=0) if isinstance(x, torch.Tensor) else x

    return pytree.tree_map(widen, args), pytree.tree_map(widen, kwargs)


def _positional_names(module: torch.nn.Module, n: int) -> list[str]:
    import inspect

    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:n]


def _module_paths(module: torch.nn.Module) -> dict[str, str]:
    """Constant target -> owning module path (for display)."""
    out = {}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        out[name] = name.rsplit(".", 1)[0] if "." in name else ""
    return out


def _record_module_names(gm: fx.GraphModule, names: dict[str, str]) -> None:
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            keys.get(node)[keys.MODULE] = path.replace("L['self'].", "").replace("L__self__.", "")
        elif node.op == "get_attr":
            keys.get(node)[keys.MODULE] = names.get(str(node.target), "")


def _flatten_codegen(gm: fx.GraphModule) -> None:
    """Make ``gm`` take flat inputs and return a flat tuple; the QGraph holds the pytree specs instead."""
    gm.graph._codegen = fx.graph.CodeGen()
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if not isinstance(out.args[0], (tuple, list)):
        out.args = ((out.args[0],),)
    if hasattr(gm, "_in_spec"):
        # torch.export's unlifted module checks its inputs against the nested signature; it is now
        # called with flat inputs (the QGraph flattens), so the check must see the flat one.
        n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        gm._in_spec = pytree.tree_flatten((tuple(range(n_inputs)), {}))[1]
    gm.recompile()


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Bring an exported GraphModule to QGraph form, in place (it is already our private copy).

    - drop export's ``_guards_fn`` module call and metadata-assert ops;
    - turn every parameter into a frozen buffer (``requires_grad=False``);
    - rewrite every linear written as ``mm`` / ``addmm`` (GPT-2's ``Conv1D``, ``x @ W``) into
      ``aten.linear``, and cut fused projections split along their outputs into one linear each
      (:mod:`qcompile.frontend.linear_forms`);
    - drop constants nothing reads (e.g. the embedding copy left by a tied lm_head);
    - give every node ``meta["val"]``.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _ASSERT_OPS and not node.users:
            graph.erase_node(node)
    for name in [n for n, _ in gm.named_children() if n.startswith("_guards")]:
        delattr(gm, name)
    _freeze_parameters(gm)
    canonicalize_linears(gm)
    split_fused_linears(gm)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    _drop_unused_constants(gm)
    for node in graph.nodes:
        if node.op == "get_attr":
            value = resolve_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                node.meta["val"] = value.detach().to("meta")
    missing = [n.name for n in graph.nodes if n.op not in ("output",) and "val" not in n.meta]
    if missing:
        raise CaptureError(f"capture: nodes without meta['val'] after export: {missing[:5]}")
    graph.lint()
    gm.recompile()
    return gm


def _freeze_parameters(gm: torch.nn.Module) -> None:
    for module in gm.modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            del module._parameters[pname]
            module.register_buffer(pname, param.detach().requires_grad_(False), persistent=True)


def _drop_unused_constants(gm: fx.GraphModule) -> None:
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for module_path, module in list(gm.named_modules()):
        for bname in list(module._buffers):
            full = f"{module_path}.{bname}" if module_path else bname
            if full not in used:
                del module._buffers[bname]
