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
4. run ``options["recipe"]`` with :func:`qcompile.pipeline.manager.run_recipe` (calibration batches
   from ``options["calibration"]`` or ``options["tokenizer"]``, as :func:`qcompile.quantize`);
5. lower (:mod:`qcompile.frontend.compile_lowering`): ``fold_qdq`` → ``lower_kernels`` (the device's
   kernels) → Inductor, unless ``options["lowering"]`` says ``"reference"`` or ``"none"``.

Compile once: the recipe's result is cached, keyed by the identity of the weights Dynamo hands over
(the tensors themselves, held weakly, with their data pointers and versions), the recipe and its
calibration options, and Dynamo's graph code. Dynamo asking again for the same graph with the same
weights (``torch._dynamo.reset()``, a second ``torch.compile`` of the model with the same options, the
same code reached from another frame) reuses the quantized graph without running a pass. A graph that
Dynamo reuses for *other* weights — with inlined nn modules the parameters are graph inputs, so one
compiled layer serves every instance of its class — is checked on every call: the weights are
compared by identity (a few hundred pointer comparisons), and new weights get their own quantized
graph (cached the same way) instead of silently running the first instance's frozen copies.

A new input shape: Dynamo's first graph is static (sizes baked into its code) and only its
recompile is symbolic, so the default costs one more capture and recipe run on the first new shape,
after which every shape runs on the symbolic graph. ``torch.compile(..., dynamic=True)`` makes the
first graph symbolic: the recipe runs once and no shape ever recompiles.

The callable returned to Dynamo takes Dynamo's full argument list (weights included, as Dynamo calls
it) and forwards only the user inputs to the lowered graph. It runs under ``no_grad``: qcompile compiles for
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
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from qcompile.frontend.compile_lowering import LOWERINGS, eager_runner, inductor_runner, lower
from qcompile.frontend.compile_reuse import generalizes, user_tensor_indices
from qcompile.frontend.dynamo import DynamoCapture, capture_dynamo_graph, hint_int
from qcompile.ir import QGraph

log = logging.getLogger(__name__)

__all__ = [
    "BackendOptions",
    "CompiledGraph",
    "DynamoCapture",
    "capture_dynamo_graph",
    "clear_cache",
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
        calibration: calibration batches for a recipe that calibrates (tensors or tuples of the
            graph's positional inputs), or a :class:`qcompile.CalibrationConfig` (with ``tokenizer``).
        tokenizer: a tokenizer; with a calibrating recipe and no ``calibration`` it means
            ``CalibrationConfig()`` — 128 × 512 tokens of WikiText-2 validation, as ``qcompile.quantize``.
        lowering: ``"kernels"`` (fold, the device's kernels, Inductor), ``"reference"`` (fold, the ops'
            torch references, no Inductor) or ``"none"`` (the recipe's graph as is). See
            :mod:`qcompile.frontend.compile_lowering`.
        inductor: hand the lowered graph to Inductor; None means yes when a recipe is given and
            ``lowering="kernels"`` (without a recipe the backend is the capture front door: the
            captured graph runs as it is, for comparing IRs).
        cache: reuse the recipe's result for the same weights, recipe and graph (module docstring).
        ctx: a :class:`qcompile.pipeline.contract.PassContext` to start from. Each compiled graph gets its own
            copy (fresh ``state``), since one model can compile into several graphs.
            When it holds no ``sample_inputs``, the graph's own example inputs are used.
        instruments: instruments handed to the pass manager (IR dumps, timing, equivalence checks).
        debug: a list; a :class:`CompiledGraph` is appended to it for every graph compiled.
    """

    recipe: Any = None
    calibration: Any = None
    tokenizer: Any = None
    lowering: str = "kernels"
    inductor: bool | None = None
    cache: bool = True
    ctx: Any = None
    instruments: Sequence[Any] | None = None
    debug: list | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> BackendOptions:
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"qcompile backend: options must be a dict, got {type(options).__name__}")
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(
                f"qcompile backend: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known options: {', '.join(known)}"
            )
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        """Check every option's type and value before any graph is touched; errors name the option."""
        if self.debug is not None and not isinstance(self.debug, list):
            raise ValueError(
                f"qcompile backend: options['debug'] must be a list, got {type(self.debug).__name__}"
            )
        if self.lowering not in LOWERINGS:
            raise ValueError(
                f"qcompile backend: options['lowering'] = {self.lowering!r}; valid: {', '.join(LOWERINGS)}"
            )
        for name in ("inductor", "cache"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"qcompile backend: options[{name!r}] must be a bool, got {value!r}")
        if self.inductor and self.lowering != "kernels":
            raise ValueError(
                f"qcompile backend: options['inductor'] = True needs lowering 'kernels', got {self.lowering!r} "
                "(the reference lowering exists to run the ops' torch references as they are)"
            )
        if self.recipe is None and (self.calibration is not None or self.tokenizer is not None):
            raise ValueError(
                "qcompile backend: options['calibration'] / options['tokenizer'] feed a recipe; give "
                "options['recipe'] too"
            )
        if self.calibration is not None and not _is_calibration(self.calibration):
            raise ValueError(
                "qcompile backend: options['calibration'] must be a list of input batches (tensors or "
                f"tuples of tensors) or a qcompile.CalibrationConfig, got {type(self.calibration).__name__}"
            )
        if self.recipe is not None:
            recipe = self.load_recipe()  # an unknown recipe or option is reported now, naming the option
            ctx_data = getattr(self.ctx, "calibration", None)
            if (
                recipe.needs_calibration()
                and self.calibration is None
                and self.tokenizer is None
                and not ctx_data
            ):
                raise ValueError(
                    f"qcompile backend: recipe {recipe.name!r} calibrates: give options['calibration'] = "
                    "[input batches] or options['tokenizer'] = tok (WikiText-2 validation windows, as "
                    "qcompile.quantize(..., tokenizer=tok))"
                )

    def load_recipe(self) -> Any:
        from qcompile.pipeline.recipe import load_recipe

        try:
            return load_recipe(self.recipe)
        except Exception as exc:
            raise ValueError(f"qcompile backend: options['recipe'] = {self.recipe!r}: {exc}") from exc

    @property
    def use_inductor(self) -> bool:
        if self.inductor is None:
            return self.lowering == "kernels" and self.recipe is not None
        return self.inductor


def _is_calibration(value: Any) -> bool:
    from qcompile.api import CalibrationConfig

    if isinstance(value, CalibrationConfig):
        return True
    if not isinstance(value, (list, tuple)) or not value:
        return False
    return all(
        isinstance(b, torch.Tensor)
        or (isinstance(b, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in b))
        for b in value
    )


# ---- debugging records ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class CompiledGraph:
    """One graph Dynamo handed to the backend, and what became of it (for debugging)."""

    qgraph: QGraph  # the recipe's graph (captured, then rewritten by the recipe), before lowering
    pipeline: Any  # the PipelineResult of the recipe; None without a recipe
    recipe: Any
    input_indices: tuple[int, ...]  # which of Dynamo's arguments the QGraph takes, in order
    constants: dict[str, str]  # get_attr target -> the Dynamo placeholder it replaced
    scalars: dict[str, float | int]  # Dynamo placeholder -> the module number baked in its place
    dynamo_code: str  # Dynamo's graph as Python source, before normalisation
    lowered: QGraph | None = None  # after the lowering passes (what Inductor compiled), if any ran
    lowering: Any = None  # the PipelineResult of the lowering passes (fold_qdq, lower_kernels)
    inductor: bool = False  # whether Inductor compiled the lowered graph
    cache_hit: bool = False  # the quantized graph came from the cache: no pass ran for this graph


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


# ---- the cache: compile once per weights + recipe + graph -------------------------------------------


@dataclasses.dataclass(eq=False)
class _Product:
    """What one graph and one set of weights compile into: the record and the runner of the
    lowered graph (flat user inputs -> flat outputs)."""

    entry: CompiledGraph
    run: Callable[[list[Any]], Any]


class _WeightsKey:
    """The identity of the weights a graph was compiled with: the tensors (held weakly), their data
    pointers and versions. Equal only while every tensor is alive and unchanged."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.refs = [weakref.ref(t) for t in tensors]
        self.stamp = tuple((id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in tensors)

    def alive(self) -> bool:
        return all(r() is not None for r in self.refs)


_CACHE_SIZE = 8
_CACHE: collections.OrderedDict[tuple, tuple[_WeightsKey, _Product]] = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
# (weights stamp, options key) -> [(Dynamo's graph, its symbolic product)]: what a specialisation
# of the same code can reuse (qcompile.frontend.compile_reuse)
_SYMBOLIC: dict[tuple, list[tuple[fx.GraphModule, list[int], _Product]]] = {}
_WEIGHTS_OF: dict[tuple, _WeightsKey] = {}  # the weights of each _SYMBOLIC group (to drop dead ones)


def clear_cache() -> None:
    """Drop every cached quantized graph (they also go when their weights are freed)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _SYMBOLIC.clear()
        _WEIGHTS_OF.clear()


def _is_symbolic(qgraph: QGraph) -> bool:
    for node in qgraph.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape):
            return True
    return False


def _remember_symbolic(
    group: tuple, weights: _WeightsKey, gm: fx.GraphModule, weight_indices: list[int], product: _Product
) -> None:
    """Keep a symbolic product for later specialisations; entries whose weights were freed go, and at
    most ``_CACHE_SIZE`` are kept (oldest dropped), like the cache itself."""
    for key in [k for k, entries in _SYMBOLIC.items() if not _WEIGHTS_OF[k].alive()]:
        del _SYMBOLIC[key], _WEIGHTS_OF[key]
    _SYMBOLIC.setdefault(group, []).append((gm, list(weight_indices), product))
    _WEIGHTS_OF[group] = weights
    while sum(len(v) for v in _SYMBOLIC.values()) > _CACHE_SIZE:
        oldest = next(iter(_SYMBOLIC))
        _SYMBOLIC[oldest].pop(0)
        if not _SYMBOLIC[oldest]:
            del _SYMBOLIC[oldest], _WEIGHTS_OF[oldest]


def _reuse_symbolic(
    group: tuple, gm: fx.GraphModule, weight_indices: list[int], opts: BackendOptions
) -> _Product | None:
    """A symbolic product of the same weights and options whose Dynamo graph ``gm`` specialises."""
    with _CACHE_LOCK:
        candidates = list(_SYMBOLIC.get(group, ()))
    for general, general_weights, product in candidates:
        if not generalizes(general, gm):
            continue
        users_general = user_tensor_indices(general, general_weights)
        users_special = user_tensor_indices(gm, weight_indices)
        if len(users_general) != len(users_special) or not set(product.entry.input_indices) <= set(
            users_general
        ):
            continue
        mapping = dict(zip(users_general, users_special, strict=True))
        indices = tuple(mapping[i] for i in product.entry.input_indices)
        entry = dataclasses.replace(product.entry, input_indices=indices, dynamo_code=gm.code, cache_hit=True)
        log.info("qcompile backend: Dynamo specialised a compiled graph (new sizes); reusing it")
        return _Product(entry, product.run)
    return None


def _options_key(opts: BackendOptions) -> tuple:
    """What besides the weights and the graph decides the result: the recipe and its data."""
    recipe = opts.load_recipe() if opts.recipe is not None else None
    recipe_key = repr(recipe.to_dict()) if hasattr(recipe, "to_dict") else repr(recipe)
    calibration = opts.calibration
    if isinstance(calibration, (list, tuple)):
        calibration = ("batches", id(calibration), len(calibration))
    return (recipe_key, repr(calibration), id(opts.tokenizer), id(opts.ctx), opts.lowering, opts.use_inductor)


def _cache_get(key: tuple) -> _Product | None:
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is None:
            return None
        weights, product = hit
        if not weights.alive():
            del _CACHE[key]
            return None
        _CACHE.move_to_end(key)
        return product


def _cache_put(key: tuple, weights: _WeightsKey, product: _Product) -> None:
    with _CACHE_LOCK:
        for stale in [k for k, (w, _) in _CACHE.items() if not w.alive()]:
            del _CACHE[stale]
        _CACHE[key] = (weights, product)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)


# ---- compiling one graph ----------------------------------------------------------------------------


def _run_recipe(qgraph: QGraph, opts: BackendOptions, sample: tuple) -> tuple[QGraph, Any]:
    """Run ``opts.recipe`` on ``qgraph`` with the pass manager; ``sample`` feeds equivalence checks."""
    from qcompile.api import calibration_batches_for
    from qcompile.pipeline.contract import PassContext
    from qcompile.pipeline.manager import run_recipe

    recipe = opts.load_recipe()
    try:
        batches = calibration_batches_for(recipe, opts.calibration, opts.tokenizer, progress=False)
    except ValueError as exc:
        raise ValueError(
            f"qcompile backend: options['recipe'] = {recipe.name!r}: {exc} (torch.compile: give "
            "options['calibration'] = [batches] or options['tokenizer'] = tok)"
        ) from exc
    _check_calibration_fits(qgraph, batches, recipe.name)
    if opts.ctx is None:
        ctx = PassContext(sample_inputs=[sample], calibration=batches, show_progress=False)
    elif isinstance(opts.ctx, PassContext):
        ctx = dataclasses.replace(
            opts.ctx,
            state={},
            sample_inputs=list(opts.ctx.sample_inputs) or [sample],
            calibration=opts.ctx.calibration if opts.ctx.calibration is not None else batches,
        )
    else:
        raise ValueError(
            f"qcompile backend: options['ctx'] must be a PassContext, got {type(opts.ctx).__name__}"
        )
    result = run_recipe(qgraph, recipe, ctx=ctx, instruments=opts.instruments)
    out = getattr(result, "qgraph", None)
    if not isinstance(out, QGraph):
        raise RuntimeError(
            f"qcompile backend: run_recipe({opts.recipe!r}) returned {type(result).__name__} without a QGraph"
        )
    return out, result


def _check_calibration_fits(qgraph: QGraph, batches: list[tuple] | None, recipe: str) -> None:
    """Calibration batches run through the captured graph: a static graph (Dynamo's first, unless
    ``dynamic=True``) takes only its own sizes, so say so before the calibration fails inside."""
    if not batches:
        return
    placeholders = [n.meta.get("val") for n in qgraph.graph.nodes if n.op == "placeholder"]
    for batch in batches[:1]:
        for i, (val, x) in enumerate(zip(placeholders, batch, strict=False)):
            if not isinstance(val, torch.Tensor) or not isinstance(x, torch.Tensor):
                continue
            fixed = [(d, int(s)) for d, s in enumerate(val.shape) if not isinstance(s, torch.SymInt)]
            bad = [(d, s) for d, s in fixed if d < x.dim() and x.shape[d] != s]
            if bad or x.dim() != val.dim():
                raise ValueError(
                    f"qcompile backend: options['calibration'] for recipe {recipe!r}: input {i} of a "
                    f"batch has shape {tuple(x.shape)}, but Dynamo's graph is static for "
                    f"{tuple(val.shape)} (dims {[d for d, _ in bad]}). Compile with "
                    "torch.compile(..., dynamic=True) so one graph takes every size, or calibrate at the "
                    "call's shape."
                )


def _compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions) -> _Product:
    """Capture Dynamo's graph, run the recipe, lower (see the module docstring)."""
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
    lowered, lowering = lower(qgraph, opts.lowering, opts.instruments)
    use_inductor = opts.use_inductor
    run = inductor_runner(lowered) if use_inductor else eager_runner(lowered)
    entry = CompiledGraph(
        qgraph=qgraph,
        pipeline=pipeline,
        recipe=opts.recipe,
        input_indices=captured.input_indices,
        constants=captured.constants,
        scalars=captured.scalars,
        dynamo_code=gm.code,
        lowered=lowered if lowering is not None else None,
        lowering=lowering,
        inductor=use_inductor,
    )
    return _Product(entry, run)


def _weight_indices(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    from qcompile.frontend.dynamo import _is_weight

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [
        i
        for i, (node, ex) in enumerate(zip(placeholders, example_inputs, strict=False))
        if isinstance(ex, torch.Tensor) and _is_weight(node, ex)
    ]


class _Compiled:
    """What Dynamo calls: its full argument list in, the graph's flat outputs out.

    Holds the products per weight set: Dynamo reuses one compiled graph for every module instance
    whose code it is (parameters are graph inputs), so each call checks that the weights are the
    ones the current product was compiled with, and compiles (or fetches from the cache) a product
    for new ones.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        opts: BackendOptions,
        weight_indices: list[int],
        product: _Product,
    ) -> None:
        self.gm = gm
        # Dynamo's other example inputs (a variant's capture needs them); the weights come from the
        # call, so none is held here
        self.examples = [None if i in weight_indices else x for i, x in enumerate(example_inputs)]
        self.opts = opts
        self.n_args = len(example_inputs)
        self.weight_indices = weight_indices
        self.product = product
        self.weight_refs = [weakref.ref(example_inputs[i]) for i in weight_indices]
        self.variants: dict[tuple[int, ...], tuple[list[weakref.ref], _Product]] = {}

    @property
    def entry(self) -> CompiledGraph:
        return self.product.entry

    def _holds(self, refs: list[weakref.ref], args: tuple) -> bool:
        """Are ``args``' weights the very tensors ``refs`` point at (identity, no data compared)?"""
        return all(r() is args[i] for r, i in zip(refs, self.weight_indices, strict=True))

    def _product_for(self, args: tuple) -> _Product:
        if self._holds(self.weight_refs, args):
            return self.product
        ids = tuple(id(args[i]) for i in self.weight_indices)
        found = self.variants.get(ids)
        if found is not None and self._holds(found[0], args):
            return found[1]
        log.info("qcompile backend: a compiled graph is called with other weights; compiling them too")
        examples = list(self.examples)
        for i in self.weight_indices:
            examples[i] = args[i]
        product = _cached_compile(self.gm, examples, self.opts, self.weight_indices)
        self.variants[ids] = ([weakref.ref(args[i]) for i in self.weight_indices], product)
        return product

    def __call__(self, *args: Any) -> Any:
        if len(args) != self.n_args:
            raise TypeError(f"qcompile backend: compiled graph takes {self.n_args} inputs, got {len(args)}")
        product = self._product_for(args)
        entry = product.entry
        flat = product.run([args[i] for i in entry.input_indices])
        if not isinstance(flat, (list, tuple)):
            flat = (flat,)
        if entry.qgraph.out_spec is None:
            return tuple(flat)
        return pytree.tree_unflatten(list(flat), entry.qgraph.out_spec)


def _cached_compile(
    gm: fx.GraphModule, example_inputs: Sequence[Any], opts: BackendOptions, weight_indices: list[int]
) -> _Product:
    if not opts.cache:
        product = _compile_graph(gm, example_inputs, opts)
        _record(product.entry, opts.debug)
        return product
    weights = _WeightsKey([example_inputs[i] for i in weight_indices])
    group = (weights.stamp, _options_key(opts))
    key = (*group, gm.code)
    product = _cache_get(key)
    if product is not None:
        log.info("qcompile backend: the same weights, recipe and graph were compiled before; reusing them")
        product = _Product(dataclasses.replace(product.entry, cache_hit=True), product.run)
    else:
        product = _reuse_symbolic(group, gm, weight_indices, opts)
    if product is None:
        product = _compile_graph(gm, example_inputs, opts)
        _cache_put(key, weights, product)
        if _is_symbolic(product.entry.lowered or product.entry.qgraph):
            with _CACHE_LOCK:
                _remember_symbolic(group, weights, gm, weight_indices, product)
    _record(product.entry, opts.debug)
    return product


def qcompile_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable[..., Any]:
    """The Dynamo backend behind ``torch.compile(model, backend="qcompile", options={...})``.

    Args:
        gm: Dynamo's graph (torch-level ops; weights as placeholders). Not modified.
        example_inputs: one per placeholder: real tensors, the live parameters, and SymInt sizes.
        options: see :class:`BackendOptions` (``recipe``, ``calibration``, ``tokenizer``, ``lowering``,
            ``inductor``, ``cache``, ``ctx``, ``instruments``, ``debug``).
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
    indices = _weight_indices(gm, example_inputs)
    product = _cached_compile(gm, example_inputs, opts, indices)
    return _Compiled(gm, example_inputs, opts, indices, product)
