"""The public entry point: ``qcompile.quantize(model, recipe, ...) -> QuantizedModel``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.frontend.capture import capture
from qcompile.ir import QGraph
from qcompile.pipeline.contract import PassContext
from qcompile.pipeline.instruments import Instrument
from qcompile.pipeline.manager import PassManager, PipelineResult, RecipeLike
from qcompile.pipeline.recipe import Recipe, load_recipe


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

    def __init__(self, qgraph: QGraph, recipe: Recipe, pipeline: PipelineResult) -> None:
        self.qgraph = qgraph
        self.recipe = recipe
        self.pipeline = pipeline

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
    batches = _calibration_batches(recipe_obj, calibration, tokenizer, progress)
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
    return QuantizedModel(pipeline.qgraph, recipe_obj, pipeline)


def _calibration_batches(
    recipe: Recipe, calibration: Any, tokenizer: Any, progress: bool
) -> list[tuple] | None:
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
