"""Text form of a QGraph: one node per line, stable and diffable (used by the IR-dump instrument)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from qcompile.ir import keys


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return "%" + a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    if isinstance(a, float):
        return f"{a:.6g}"
    return repr(a)


def _fmt_val(node: fx.Node) -> str:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        shape = "x".join(str(d) for d in val.shape)
        return f"{str(val.dtype).replace('torch.', '')}[{shape}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_fmt_val_obj(v) for v in val) + ")"
    return ""


def _fmt_val_obj(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}[{'x'.join(str(d) for d in v.shape)}]"
    return type(v).__name__


def _fmt_ann(node: fx.Node) -> str:
    ann = node.meta.get(keys.NAMESPACE) or {}
    parts = []
    for key in (keys.ROLE, keys.LAYER):
        if ann.get(key) is not None:
            parts.append(f"{key}={ann[key]}")
    q = ann.get(keys.QUANT)
    if q is not None:
        parts.append(f"quant={q}")
    spec = ann.get(keys.QSPEC)
    if spec is not None and q is None:  # annotated, not yet converted
        describe = getattr(spec, "describe", None)
        parts.append(f"qspec={describe() if callable(describe) else spec}".replace(" ", "_"))
    return ("  # " + " ".join(parts)) if parts else ""


def format_node(node: fx.Node) -> str:
    if node.op == "placeholder":
        body = f"input {node.target}"
    elif node.op == "get_attr":
        body = f"const {node.target}"
    elif node.op == "output":
        return f"return {_fmt_arg(node.args[0])}"
    else:
        target = node.target
        name = str(target) if not callable(target) or not hasattr(target, "__name__") else target.__name__
        if isinstance(target, torch._ops.OpOverload):
            name = f"{target.namespace}.{target._schema.name.split('::')[-1]}"
            if target._overloadname != "default":
                name += f".{target._overloadname}"
        args = ", ".join(_fmt_arg(a) for a in node.args)
        kwargs = ", ".join(f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items())
        body = f"{name}({args}{', ' if args and kwargs else ''}{kwargs})"
    return f"%{node.name} = {body} : {_fmt_val(node)}{_fmt_ann(node)}"


def format_graph(qgraph: Any) -> str:
    return "\n".join(format_node(n) for n in qgraph.graph.nodes) + "\n"
