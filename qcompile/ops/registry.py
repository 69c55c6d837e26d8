"""The op registry: every ``qcompile::`` op in one table, and which backend implements which op.

An op is defined once, with :func:`define` (a thin wrapper over ``torch.library.custom_op``): its
schema, its torch reference implementation (the function itself, which is what runs eagerly and is
the ground truth every backend is checked against) and, next to it in the same module, its fake
implementation (``register_fake``: shapes and dtypes only, for FakeTensor propagation and export).
``import qcompile`` imports every op module, so any graph qcompile produces runs after it.

Backends do not define ops; they *register implementations* of them (:func:`register_impl`): the
ONNX backend its translations, a kernel backend its kernels. :func:`coverage` is the one table that
says which backend implements which op (``docs/ops.md`` prints it; a test checks the ONNX column is
complete). The ``reference`` column is always full: the reference implementation is the op.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

NAMESPACE = "qcompile"
REFERENCE = "reference"


@dataclass(frozen=True)
class OpDef:
    """One registered op: ``torch.ops.qcompile.<name>.default`` is ``overload``."""

    name: str
    schema: str
    doc: str  # first paragraph of the reference implementation's docstring
    overload: torch._ops.OpOverload
    reference: Callable[..., Any]
    module: str  # where the op (reference and fake) is defined


@dataclass(frozen=True)
class KernelImpl:
    """How a kernel backend (``"triton"``, ``"cpu"``) realises one registry op in a graph.

    A lowering pass replaces each call of the registry op by a call of ``op``. The call's arguments
    arrive as a dict keyed by the registry op's schema names: constants (weights, scales, zero
    points, bias) as tensors, runtime inputs as opaque placeholders (fx nodes) that must be passed
    through unchanged, ints / bools / None as themselves.

    Attributes:
        op: the kernel's torch op (a ``torch.library.triton_op`` or ``custom_op``, or an aten op).
        prepare: ``args -> kwargs of op``: repacks the constants into the kernel's layout once, at
            lowering (the repacked tensors become the graph's new constants) and passes the
            runtime inputs through.
        supports: ``(args, device) -> None`` when the kernel handles this call, else the reason it
            does not (the call then keeps the reference implementation and the pass reports why).
    """

    op: Any
    prepare: Callable[[dict[str, Any]], dict[str, Any]]
    supports: Callable[[dict[str, Any], torch.device], str | None]


OPS: dict[str, OpDef] = {}
# backend name -> op name -> the backend's implementation (its meaning is the backend's own)
_IMPLS: dict[str, dict[str, Any]] = {}


def define(name: str, schema: str) -> Callable[[Callable[..., Any]], Any]:
    """Decorator: register ``qcompile::<name>`` with ``schema`` and the decorated function as its
    reference implementation. Returns torch's ``CustomOpDef`` (call ``.register_fake`` on it)."""

    def wrap(fn: Callable[..., Any]) -> Any:
        if name in OPS:
            raise ValueError(f"op qcompile::{name} is defined twice ({OPS[name].module}, {fn.__module__})")
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)(fn)
        overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        doc = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
        OPS[name] = OpDef(name, schema, doc, overload, fn, fn.__module__)
        return op

    return wrap


def op_name(op: str | torch._ops.OpOverload) -> str:
    """``"qlinear_w"`` for the name itself or for ``torch.ops.qcompile.qlinear_w.default``."""
    if isinstance(op, str):
        name = op.removeprefix(f"{NAMESPACE}::")
    else:
        if op.namespace != NAMESPACE:
            raise KeyError(f"{op} is not a {NAMESPACE}:: op")
        name = op._schema.name.split("::")[-1]
    if name not in OPS:
        raise KeyError(f"unknown op {NAMESPACE}::{name}; registered: {', '.join(sorted(OPS))}")
    return name


def is_qcompile_op(node_target: Any, *names: str) -> bool:
    """Is ``node_target`` a registered qcompile op (one of ``names`` when given)?"""
    if not isinstance(node_target, torch._ops.OpOverload) or node_target.namespace != NAMESPACE:
        return False
    return not names or node_target._schema.name.split("::")[-1] in names


def register_impl(backend: str, op: str | torch._ops.OpOverload, impl: Any) -> None:
    """Record ``backend``'s implementation of ``op`` (a backend module calls this at import)."""
    if backend == REFERENCE:
        raise ValueError("the reference implementation is the op itself; it is not registered")
    name = op_name(op)
    table = _IMPLS.setdefault(backend, {})
    if name in table and table[name] is not impl:
        raise ValueError(f"backend {backend!r} registers two implementations of {NAMESPACE}::{name}")
    table[name] = impl


def implementation(backend: str, op: str | torch._ops.OpOverload) -> Any:
    """``backend``'s implementation of ``op``; a KeyError names the op and the backend."""
    name = op_name(op)
    if backend == REFERENCE:
        return OPS[name].reference
    try:
        return _IMPLS[backend][name]
    except KeyError:
        raise KeyError(
            f"backend {backend!r} has no implementation of {NAMESPACE}::{name} "
            f"(it implements: {', '.join(sorted(_IMPLS.get(backend, {}))) or 'nothing'})"
        ) from None


def implementations(backend: str) -> dict[str, Any]:
    """Every op ``backend`` implements: op name -> implementation."""
    if backend == REFERENCE:
        return {name: d.reference for name, d in OPS.items()}
    return dict(_IMPLS.get(backend, {}))


def backends() -> list[str]:
    """Backends that registered at least one implementation (after their modules were imported),
    the reference first."""
    return [REFERENCE, *sorted(_IMPLS)]


def coverage() -> dict[str, dict[str, bool]]:
    """op name -> backend -> implemented?"""
    names = backends()
    return {op: {b: b == REFERENCE or op in _IMPLS.get(b, {}) for b in names} for op in sorted(OPS)}


def missing(backend: str) -> list[str]:
    """Registered ops ``backend`` does not implement."""
    return [op for op, row in coverage().items() if not row.get(backend, False)]


def coverage_table() -> str:
    """Markdown: one row per op (schema and what it does), one column per backend."""
    names = backends()
    lines = [
        "| op | " + " | ".join(names) + " | what it computes |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for op, row in coverage().items():
        marks = " | ".join("yes" if row[b] else "—" for b in names)
        lines.append(f"| `{NAMESPACE}::{op}` | {marks} | {OPS[op].doc} |")
    return "\n".join(lines)
