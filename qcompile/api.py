"""The public entry points: ``qcompile.quantize(model, recipe, ...) -> QuantizedModel`` and
``qcompile.lower(quantized, target=...) -> artifact`` (a target's passes after the recipe's)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.frontend.capture import capture
from qcompile.ir import QGraph, keys
from qcompile.pipeline.contract import PassContext
from qcompile.pipeline.instruments import DumpIR, Instrument
from qcompile.pipeline.manager import PassManager, PipelineResult, RecipeLike
from qcompile.pipeline.recipe import Recipe, load_recipe
from qcompile.pipeline.targets import get_target


@dataclass
class CalibrationConfig:
    """Where calibration text comes from when the caller gives a tokenizer instead of batches.

    Always the WikiText-2 *validation* split (``wiki.valid.tokens``); the test split is for
    perplexity only.
    """

    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0


class QuantizedModel:
    """A quantized model: callable like the original forward, holding the QGraph and every pass report."""

    def __init__(
        self,
        qgraph: QGraph,
        recipe: Recipe,
        pipeline: PipelineResult,
        sample_inputs: list[tuple] | None = None,
    ) -> None:
        self.qgraph = qgraph
        self.recipe = recipe
        self.pipeline = pipeline
        # inputs the graph was checked on (and a lowering traces a graph that is not a decode step on)
        self.sample_inputs = list(sample_inputs or [])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.qgraph(*args, **kwargs)

    @property
    def reports(self) -> dict[str, dict[str, Any]]:
        """Pass name -> structured report (last run of each pass)."""
        return {name: result.report for name, result in self.pipeline.results}

    def report(self, pass_name: str) -> dict[str, Any]:
        return self.pipeline.result(pass_name).report

    def summary(self) -> str:
        return f"recipe {self.recipe.name}\n" + self.pipeline.summary()

    def export_onnx(
        self,
        path: str | os.PathLike,
        options: Mapping[str, Any] | Any | None = None,
        *,
        instruments: Iterable[Instrument] | None = None,
    ) -> Any:
        """Lower to target ``onnx`` and write the file; returns its ``ExportReport``. ``options``:
        the target's ``ExportOptions`` (or a dict of them)."""
        return lower(self, "onnx", options, instruments=instruments).save(path)

    def __repr__(self) -> str:
        return f"QuantizedModel(recipe={self.recipe.name!r}, {self.qgraph!r})"


def _as_batches(items: Iterable[Any]) -> list[tuple]:
    return [tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in items]


def quantize(
    model: torch.nn.Module | QGraph,
    recipe: RecipeLike,
    *,
    calibration: Sequence[Any] | CalibrationConfig | None = None,
    example_inputs: tuple | torch.Tensor | None = None,
    tokenizer: Any = None,
    instruments: Iterable[Instrument] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> QuantizedModel:
    """Capture ``model`` (unless it already is a QGraph) and run ``recipe`` on it.

    Args:
        model: an ``nn.Module`` (copied, never modified) or a QGraph (never modified either).
        recipe: a shipped recipe name (``qcompile.pipeline.recipe.list_recipes()``), a TOML path, a dict or
            a :class:`Recipe`.
        calibration: input batches (tensors or tuples of positional inputs), or a
            :class:`CalibrationConfig` (needs ``tokenizer``); None with a tokenizer and a recipe that
            calibrates means ``CalibrationConfig()`` — 128 × 512 tokens of wiki.valid.tokens.
        example_inputs: inputs for capture; default: the first calibration batch, else a short
            tokenized sentence when a tokenizer is given.
        tokenizer: used to build calibration windows and a default example input.
        instruments: pass-manager instruments (dump IR, timing, stop-after, equivalence check).
    """
    recipe_obj = load_recipe(recipe)
    batches = calibration_batches_for(recipe_obj, calibration, tokenizer, progress)
    if isinstance(model, QGraph):
        qgraph = model
    else:
        example = _example_inputs(example_inputs, batches, tokenizer)
        qgraph = capture(model, example)
    sample = [batches[0]] if batches else []
    if not sample and example_inputs is not None:
        sample = _as_batches([example_inputs])
    ctx = PassContext(sample_inputs=sample, calibration=batches, seed=seed, show_progress=progress)
    pipeline = PassManager.from_recipe(recipe_obj, instruments).run(qgraph, ctx)
    return QuantizedModel(pipeline.qgraph, recipe_obj, pipeline, sample)


def lower(
    model: QuantizedModel | QGraph,
    target: str = "onnx",
    options: Mapping[str, Any] | Any | None = None,
    *,
    instruments: Iterable[Instrument] | None = None,
    sample_inputs: Sequence[Any] | None = None,
) -> Any:
    """Run target ``target``'s passes (:mod:`qcompile.pipeline.targets`) on a quantized model's graph
    and return the target's artifact (``onnx``: an ``OnnxArtifact``; ``.save(path)`` writes it).

    The caller's graph is not modified (the pass manager works on a copy). ``options``: the target's
    options dataclass or a dict of its fields. ``sample_inputs`` (tuples of positional inputs):
    what the equivalence check runs and a graph that is not a decode step is traced on (default: the
    quantized model's own, or a random cached step for a decode step). ``QCOMPILE_DUMP_DIR``
    continues the numbering of the dump the recipe's pipeline left there.
    """
    tgt = get_target(target)
    opts = tgt.build_options(options)
    qgraph = model.qgraph if isinstance(model, QuantizedModel) else model
    if not isinstance(qgraph, QGraph):
        raise TypeError(f"lower: expected a QuantizedModel or a QGraph, got {type(model).__name__}")
    decode_step = keys.INFO_DECODER in qgraph.info
    samples = _lowering_samples(model, qgraph, sample_inputs)
    passes = tgt.passes(opts, decode_step)
    ctx = PassContext(sample_inputs=samples, show_progress=False)
    pipeline = PassManager(passes, _continuing_dump(instruments)).run(qgraph, ctx)
    return tgt.make_artifact(pipeline.ir, pipeline, opts)


def _lowering_samples(model: Any, qgraph: QGraph, given: Sequence[Any] | None) -> list[tuple]:
    if given is not None:
        return _as_batches(given)
    if isinstance(model, QuantizedModel) and model.sample_inputs:
        return list(model.sample_inputs)
    layout = qgraph.info.get(keys.INFO_DECODER)
    if layout is not None:
        from qcompile.frontend.decoder import example_decoder_inputs

        return [example_decoder_inputs(layout, batch=2, past=4, seq=3)]
    return []


def _continuing_dump(instruments: Iterable[Instrument] | None) -> list[Instrument]:
    """The caller's instruments, plus a ``DumpIR`` that continues the directory's numbering when
    ``QCOMPILE_DUMP_DIR`` asks for a dump and the caller gave none."""
    given = list(instruments or [])
    directory = os.environ.get("QCOMPILE_DUMP_DIR")
    if directory and not any(isinstance(i, DumpIR) for i in given):
        given.insert(0, DumpIR(directory, append=True))
    return given


def calibration_batches_for(
    recipe: Recipe, calibration: Any, tokenizer: Any, progress: bool = True
) -> list[tuple] | None:
    """The calibration batches ``recipe`` runs on: ``calibration`` (batches or a
    :class:`CalibrationConfig`), or with only a tokenizer and a calibrating recipe
    ``CalibrationConfig()`` over wiki.valid.tokens; None when the recipe needs none. Shared by
    :func:`quantize` and the ``torch.compile`` backend's ``calibration`` / ``tokenizer`` options."""
    if calibration is None and tokenizer is not None and recipe.needs_calibration():
        calibration = CalibrationConfig()
    if isinstance(calibration, CalibrationConfig):
        if tokenizer is None:
            raise ValueError("quantize: a CalibrationConfig needs tokenizer= to tokenize wiki.valid.tokens")
        from qcompile.tools.data import calibration_windows

        windows = calibration_windows(
            tokenizer, n_samples=calibration.n_samples, seq_len=calibration.seq_len, seed=calibration.seed
        )
        return _as_batches(windows)
    if calibration is None:
        if recipe.needs_calibration():
            raise ValueError(
                f"quantize: recipe {recipe.name!r} calibrates; pass calibration=[batches] or tokenizer="
            )
        return None
    return _as_batches(calibration)


def _example_inputs(example_inputs: Any, batches: list[tuple] | None, tokenizer: Any) -> tuple:
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if batches:
        return batches[0]
    if tokenizer is not None:
        return (tokenizer("qcompile captures this sentence.", return_tensors="pt").input_ids,)
    raise ValueError(
        "quantize: give example_inputs=, calibration= or tokenizer= so the model can be captured"
    )
