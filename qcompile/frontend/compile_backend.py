"""Front door 2: ``torch.compile(model, backend="qcompile", options={...})``.

The backend is registered by entry point (``[project.entry-points.torch_dynamo_backends]``), so the
string works after ``pip install``. ``torch.compile`` hands ``options`` to a non-inductor backend as
the keyword ``options=`` (``torch._TorchCompileWrapper``), and ``mode=`` when a mode is given.

What Dynamo gives a backend: an ``fx.GraphModule`` of torch-level calls (``torch._C._nn.linear``,
``F.scaled_dot_product_attention``, methods on tensors) and ``example_inputs``, one per placeholder.
With inlined nn modules (the default since torch 2.5) every parameter and buffer the graph reads
arrives as a placeholder too — named like ``l_self_modules_fc_parameters_weight_``, with the live
``nn.Parameter`` (or buffer tensor) as its example input. After a recompile for a new shape, Dynamo
adds ``SymInt`` placeholders (the symbolic sizes) and marks the changed tensor dims symbolic.

How it becomes the *same* QGraph :func:`qcompile.frontend.capture` builds (one IR, passes written once):

1. copy Dynamo's graph and turn each weight placeholder into ``get_attr`` of a frozen copy registered
   under the weight's module path (``model.layers.0.mlp.up_proj.weight``) — so ``torch.export`` sees
   weights as module state, exactly as in capture, and the caller's tensors are never shared.
   Symbolic sizes Dynamo passes as ``SymInt`` inputs become ``aten.sym_size.int`` of their tensor
   (as in capture, the QGraph takes tensors only); module floats Dynamo passes as 0-dim tensors
   (``dynamic=True``) are baked in like the weights;
2. ``torch.export.export(strict=False)`` over the remaining (user) inputs — outside Dynamo's tracing
   context, so export's guards stay out of Dynamo's — with exactly the dims Dynamo made symbolic
   marked dynamic (a static first compile gives a static QGraph, like ``capture(dynamic=False)``;
   the recompile for a new shape a dynamic one, like ``capture``'s default); ``run_decompositions({})``;
3. :func:`qcompile.frontend.capture.qgraph_from_exported`, the tail both doors share (unlift, flat codegen,
   :func:`qcompile.frontend.capture.normalize`);
4. run ``options["recipe"]`` with :func:`qcompile.pipeline.manager.run_recipe`.

The callable returned to Dynamo takes Dynamo's full argument list (weights included, as Dynamo calls
it) and forwards only the user inputs to the QGraph. It runs under ``no_grad``: qcompile compiles for
inference, so the outputs carry no autograd history. Weights are copied when a graph is compiled:
later changes to the caller's parameters are not seen (the compiled graph may have quantized them).
Graphs that write module buffers or apply dropout in training mode are refused (call ``.eval()``).

Debugging: every compiled graph is recorded as a :class:`CompiledGraph`. :func:`last_compiled` and
:func:`compiled_graphs` reach those still in use (held weakly: they live as long as Dynamo's cache
keeps the compiled code); pass ``options={"debug": some_list}`` to have each record appended to your
own list and kept alive as long as the list.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from qcompile.frontend.dynamo import DynamoCapture, capture_dynamo_graph, hint_int
from qcompile.ir import QGraph

log = logging.getLogger(__name__)

__all__ = [
    "BackendOptions",
    "CompiledGraph",
    "DynamoCapture",
    "capture_dynamo_graph",
    "clear_compiled",
    "compiled_graphs",
    "last_compiled",
    "qcompile_backend",
]


# ---- options -------------------------------------------------------------------------------------


@dataclasses.dataclass
class BackendOptions:
    """``torch.compile(..., options={...})`` for the qcompile backend.

    Attributes:
        recipe: a recipe name (``"fp"``, ``"w8a8-rtn"``, ...), a recipe dict, or anything
            :func:`qcompile.pipeline.manager.run_recipe` accepts. ``None``: capture only, no passes.
        ctx: a :class:`qcompile.pipeline.contract.PassContext` to start from. Each compiled graph gets its own
            copy (fresh ``state``), since one model can compile into several graphs.
            When it holds no ``sample_inputs``, the graph's own example inputs are used.
        instruments: instruments handed to the pass manager (IR dumps, timing, equivalence checks).
        debug: a list; a :class:`CompiledGraph` is appended to it for every graph compiled.
    """

    recipe: Any = None
    ctx: Any = None
    instruments: Sequence[Any] | None = None
    debug: list | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"qcompile backend: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known options: {', '.join(known)}"
            )
        debug = options.get("debug")
        if debug is not None and not isinstance(debug, list):
            raise ValueError(f"qcompile backend: options['debug'] must be a list, got {type(debug).__name__}")
        return cls(**options)


# ---- debugging records ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CompiledGraph:
    """One graph Dynamo handed to the backend, and what became of it (for debugging)."""

    qgraph: QGraph  # the graph that runs: captured, then rewritten by the recipe
    pipeline: Any  # the PipelineResult of the recipe; None without a recipe
    recipe: Any
    input_indices: tuple[int, ...]  # which of Dynamo's arguments the QGraph takes, in order
    constants: dict[str, str]  # get_attr target -> the Dynamo placeholder it replaced
    scalars: dict[str, float | int]  # Dynamo placeholder -> the module number baked in its place
    dynamo_code: str  # Dynamo's graph as Python source, before normalisation


_HISTORY: collections.deque[weakref.ref[CompiledGraph]] = collections.deque(maxlen=64)


def _record(entry: CompiledGraph, debug: list | None) -> None:
    _HISTORY.append(weakref.ref(entry))
    if debug is not None:
        debug.append(entry)


def compiled_graphs() -> list[CompiledGraph]:
    """Every graph compiled by this backend that is still in use, oldest first."""
    return [e for e in (r() for r in _HISTORY) if e is not None]


def last_compiled() -> CompiledGraph | None:
    """The most recently compiled graph still in use (None if there is none)."""
    alive = compiled_graphs()
    return alive[-1] if alive else None


def clear_compiled() -> None:
    """Forget the recorded graphs (the compiled code itself is untouched)."""
    _HISTORY.clear()


# ---- the backend ---------------------------------------------------------------------------------


class _Compiled:
    """What Dynamo calls: its full argument list in, the graph's flat outputs (a tuple) out."""

    def __init__(self, entry: CompiledGraph, n_args: int) -> None:
        self.entry = entry
        self.n_args = n_args

    def __call__(self, *args: Any) -> Any:
        if len(args) != self.n_args:
            raise TypeError(f"qcompile backend: compiled graph takes {self.n_args} inputs, got {len(args)}")
        qgraph = self.entry.qgraph
        flat = qgraph.run_flat([args[i] for i in self.entry.input_indices])
        if not isinstance(flat, (list, tuple)):
            flat = (flat,)
        if qgraph.out_spec is None:
            return tuple(flat)
        return pytree.tree_unflatten(list(flat), qgraph.out_spec)


def _run_recipe(qgraph: QGraph, opts: BackendOptions, sample: tuple) -> tuple[QGraph, Any]:
    """Run ``opts.recipe`` on ``qgraph`` with the pass manager; ``sample`` feeds equivalence checks."""
    try:
        from qcompile.pipeline.manager import run_recipe
    except ImportError as exc:
        raise RuntimeError(
            f"qcompile backend: options['recipe']={opts.recipe!r} needs qcompile.pipeline.manager, which "
            f"failed to import ({type(exc).__name__}: {exc}). Leave out 'recipe' to compile the "
            "captured graph unchanged."
        ) from exc
    from qcompile.pipeline.contract import PassContext

    if opts.ctx is None:
        ctx = PassContext(sample_inputs=[sample])
    elif isinstance(opts.ctx, PassContext):
        ctx = dataclasses.replace(
            opts.ctx,
            state={},
            sample_inputs=list(opts.ctx.sample_inputs) or [sample],
        )
    else:
        raise ValueError(
            f"qcompile backend: options['ctx'] must be a PassContext, got {type(opts.ctx).__name__}"
        )
    result = run_recipe(qgraph, opts.recipe, ctx=ctx, instruments=opts.instruments)
    out = getattr(result, "qgraph", None)
    if not isinstance(out, QGraph):
        raise RuntimeError(
            f"qcompile backend: run_recipe({opts.recipe!r}) returned {type(result).__name__} without a QGraph"
        )
    return out, result


def qcompile_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
    """The Dynamo backend behind ``torch.compile(model, backend="qcompile", options={...})``.

    Args:
        gm: Dynamo's graph (torch-level ops; weights as placeholders). Not modified.
        example_inputs: one per placeholder: real tensors, the live parameters, and SymInt sizes.
        options: see :class:`BackendOptions` (``recipe``, ``ctx``, ``instruments``, ``debug``).
        mode: accepted for ``torch.compile(mode=...)`` and ignored (it selects inductor settings).
    """
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise TypeError(
            f"qcompile backend: unexpected argument(s) {', '.join(sorted(kwargs))}; use options={{...}}"
        )
    if mode not in (None, "default"):
        log.warning("qcompile backend: torch.compile(mode=%r) has no meaning for qcompile; ignored", mode)
    opts = BackendOptions.from_dict(options)

    captured = capture_dynamo_graph(gm, example_inputs)
    qgraph, pipeline = captured.qgraph, None
    if opts.recipe is not None:
        sample = tuple(
            example_inputs[i].detach().clone()
            if isinstance(example_inputs[i], torch.Tensor)
            else example_inputs[i]
            for i in captured.input_indices
        )
        sample = tuple(hint_int(s) if isinstance(s, torch.SymInt) else s for s in sample)
        qgraph, pipeline = _run_recipe(qgraph, opts, sample)
    entry = CompiledGraph(
        qgraph=qgraph,
        pipeline=pipeline,
        recipe=opts.recipe,
        input_indices=captured.input_indices,
        constants=captured.constants,
        scalars=captured.scalars,
        dynamo_code=gm.code,
    )
    _record(entry, opts.debug)
    return _Compiled(entry, len(example_inputs))
