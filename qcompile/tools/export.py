"""Export a transformers causal LM to ONNX in one pipeline: what ``qcompile export-onnx`` runs.

:func:`export_decoder` (the default): capture the decode step with its KV cache
(:func:`qcompile.frontend.decoder.capture_decoder`), then ONE pass manager runs the recipe (its
calibration windows run as prefills: token ids with an empty cache) and target ``onnx``'s passes (:mod:`qcompile.backends.onnx.target`) — so ``QCOMPILE_DUMP_DIR`` numbers
every step in one sequence (``00_input``, ``01_analyze``, … ``NN_onnx.export``, ``NN_onnx.share_kv_buffer``,
…) and every instrument sees the lowering too. The in-memory model is written once, at the end.
:func:`export_prefill` does the same for the plain captured forward (``input_ids -> logits`` for
every position, no cache).

:class:`ExportCommand` holds the CLI's knobs; :func:`plan_export` checks all of them (recipe, pass
and target options, disabled pass names) before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcompile.frontend.capture import capture
from qcompile.frontend.decoder import capture_decoder, example_decoder_inputs
from qcompile.ir import QGraph, keys
from qcompile.pipeline.contract import Pass, PassContext, PipelineResult
from qcompile.pipeline.instruments import DisablePasses, DumpIR, Instrument, Timing
from qcompile.pipeline.instruments.disable import is_pattern
from qcompile.pipeline.manager import PassManager, RecipeLike
from qcompile.pipeline.recipe import Recipe, load_recipe
from qcompile.pipeline.targets import get_target

MODELS = ("smollm2", "tiny-llama")
# What the shortest command writes: the recipe and head the benchmarks recommend (BENCHMARKS.md: SmolLM2
# decode 3.1-3.2x the FP32 file at 0.18x its size; the int8 lm_head + tied embedding costs <= 0.3 %
# perplexity and saves ~70 MiB).
DEFAULT_RECIPE = "w4a16-smoothquant+-gptq-kv8"
DEFAULT_HEAD_BITS = 8


class ExportError(ValueError):
    """A command-line choice that cannot work; the message says which and what is valid."""


@dataclass
class Export:
    """What an export produced: the written file's report, every pass's result, and the quantized
    graph before lowering (the reference the file was verified against; None for a prefill export)."""

    report: Any  # qcompile.backends.onnx.ExportReport
    pipeline: PipelineResult
    reference: QGraph | None = None

    @property
    def qgraph(self) -> QGraph | None:
        return self.reference

    @property
    def attention(self) -> dict[str, Any] | None:
        """The ``fuse_attention`` report (every sdpa, fused or not), when that pass ran."""
        return self.report.passes.get("fuse_attention")

    def summary(self) -> str:
        return self.pipeline.summary() + "\n" + self.report.summary()


def lowering_passes(
    recipe: RecipeLike, options: Any, decode_step: bool, target: str = "onnx"
) -> tuple[Recipe, list[Pass]]:
    """The one pipeline of an export: the recipe's passes, then the target's."""
    recipe = load_recipe(recipe)
    return recipe, recipe.build_passes() + get_target(target).passes(options, decode_step)


def _run(
    qgraph: QGraph, passes: list[Pass], ctx: PassContext, path: str | Path, instruments: Iterable[Instrument]
) -> Export:
    """One pass manager over every pass, then the one write."""
    pipeline = PassManager(passes, instruments).run(qgraph, ctx)
    artifact = get_target("onnx").make_artifact(pipeline.ir, pipeline, None)
    return Export(artifact.save(path), pipeline, ctx.state.get(keys.STATE_REFERENCE))


def _onnx_options(options: Any, model: torch.nn.Module | None) -> Any:
    """The target options, RoPE's cache length from the model's config when not given."""
    opts = get_target("onnx").build_options(options)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if opts.max_positions is None and positions:
        opts = dataclasses.replace(opts, max_positions=int(positions))
    return opts


def export_decoder(
    model: torch.nn.Module | None,
    path: str | Path,
    *,
    recipe: RecipeLike = "fp",
    calibration: Sequence[torch.Tensor] | None = None,
    options: Any = None,
    qgraph: QGraph | None = None,
    instruments: Iterable[Instrument] = (),
) -> Export:
    """Capture (or take ``qgraph``, from :func:`capture_decoder`, to reuse a capture), quantize with
    ``recipe``, lower to ONNX and write the decode step of ``model`` to ``path``.

    ``calibration``: token-id tensors, each run as a prefill; ``options``: target ``onnx``'s
    ``ExportOptions`` (or a dict); ``instruments``: the pass manager's, on top of those ``QCOMPILE_*``
    asks for. The lm_head, embedding and KV cache are quantized when the recipe's annotations say so
    (``Recipe.with_quantization``)."""
    captured = qgraph if qgraph is not None else capture_decoder(model)
    layout = captured.info[keys.INFO_DECODER]
    recipe, passes = lowering_passes(recipe, _onnx_options(options, model), decode_step=True)
    batches = None if calibration is None else [(ids, layout.empty(ids.shape[0])) for ids in calibration]
    _check_calibration(recipe, batches)
    sample = example_decoder_inputs(layout, batch=2, past=4, seq=3)  # a cached step
    ctx = PassContext(sample_inputs=[sample], calibration=batches, show_progress=False)
    return _run(captured, passes, ctx, path, instruments)


def export_prefill(
    model: torch.nn.Module | QGraph,
    example: tuple,
    path: str | Path,
    *,
    recipe: RecipeLike = "fp",
    calibration: Sequence[torch.Tensor] | None = None,
    options: Any = None,
    instruments: Iterable[Instrument] = (),
) -> Export:
    """The plain forward of ``model`` (captured on ``example``, or a captured QGraph), quantized and
    lowered to ONNX in one pipeline; every dim of the inputs dynamic."""
    qgraph = model if isinstance(model, QGraph) else capture(model, example)
    recipe, passes = lowering_passes(recipe, _onnx_options(options, None), decode_step=False)
    batches = None if calibration is None else [(ids,) for ids in calibration]
    _check_calibration(recipe, batches)
    ctx = PassContext(sample_inputs=[example], calibration=batches, show_progress=False)
    return _run(qgraph, passes, ctx, path, instruments)


def quantize_decoder(
    qgraph: QGraph, recipe: RecipeLike, calibration: Sequence[torch.Tensor] | None = None
) -> QGraph:
    """``recipe`` on a decode-step QGraph, without lowering: the reference an export of the same
    recipe is checked against."""
    layout = qgraph.info[keys.INFO_DECODER]
    recipe = load_recipe(recipe)
    batches = None if calibration is None else [(ids, layout.empty(ids.shape[0])) for ids in calibration]
    _check_calibration(recipe, batches)
    ctx = PassContext(
        sample_inputs=[example_decoder_inputs(layout)], calibration=batches, show_progress=False
    )
    return PassManager(recipe.build_passes()).run(qgraph, ctx).qgraph


def _check_calibration(recipe: Recipe, batches: list | None) -> None:
    if batches is None and recipe.needs_calibration():
        raise ExportError(f"recipe {recipe.name!r} calibrates; pass calibration=[token id tensors]")


# ---- the command line's export ----------------------------------------------------------------------


@dataclass
class ExportCommand:
    """One ``qcompile export-onnx``: model name, recipe, output path and the CLI's knobs."""

    model: str = "smollm2"
    recipe: str = DEFAULT_RECIPE
    out: str = "model.onnx"
    accuracy_level: int = 4
    int4_format: str = "matmulnbits"
    # None: DEFAULT_HEAD_BITS when the recipe quantizes (has an annotate pass), else float; 0: float
    lm_head_bits: int | None = None
    embedding_bits: int | None = None
    head_group_size: int = 64
    prefill_only: bool = False
    calib: str = "32x512"  # calibration windows × tokens (recipes that calibrate)
    kv_cache_bits: int | None = None  # 8: an int8 KV cache (the recipe's annotate gets kv_cache_bits)
    disable: list[str] = field(default_factory=list)  # pass names / patterns (DisablePasses)
    dump_dir: str | None = None  # DumpIR, like QCOMPILE_DUMP_DIR
    timing: bool = False  # Timing(echo=True), like QCOMPILE_TIMING=1

    def options(self) -> dict[str, Any]:
        return {"accuracy_level": self.accuracy_level, "int4_format": self.int4_format}

    def calibration_shape(self) -> tuple[int, int]:
        n, _, length = self.calib.lower().partition("x")
        if not (n.isdigit() and length.isdigit() and int(n) > 0 and int(length) > 1):
            raise ExportError(f"--calib {self.calib!r}: give windows x tokens, e.g. 32x512")
        return int(n), int(length)

    def instruments(self) -> list[Instrument]:
        found: list[Instrument] = []
        if self.disable:
            found.append(DisablePasses(self.disable))
        if self.dump_dir:
            found.append(DumpIR(self.dump_dir))
        if self.timing:
            found.append(Timing(echo=True))
        return found


@dataclass
class ExportPlan:
    """A checked command: the recipe to run and every pass of the pipeline."""

    recipe: Recipe
    passes: list[Pass]


def _recipe(cmd: ExportCommand) -> Recipe:
    """The recipe to run: ``cmd.recipe``, its annotations extended by ``--lm-head-bits``,
    ``--embedding-bits`` (groups of ``--head-group-size``) and ``--kv-cache-bits``."""
    recipe = load_recipe(cmd.recipe)
    quantizes = "annotate" in recipe.pass_names()

    def head(bits: int | None) -> int | None:
        if bits is None:
            return DEFAULT_HEAD_BITS if quantizes else None
        return None if bits == 0 else bits

    lm_head, embedding = head(cmd.lm_head_bits), head(cmd.embedding_bits)
    if lm_head is None and embedding is None and cmd.kv_cache_bits is None:
        return recipe
    return recipe.with_quantization(
        lm_head_bits=lm_head,
        embedding_bits=embedding,
        head_group_size=cmd.head_group_size,
        kv_cache_bits=cmd.kv_cache_bits,
    )


def plan_export(cmd: ExportCommand) -> ExportPlan:
    """Check every choice of ``cmd`` without loading a model: the model name, the recipe, the head,
    target and pass options, the calibration shape and that each ``--disable-pass`` names a pass of
    this pipeline. Raises :class:`ExportError` / ``RecipeError`` / ``TargetError`` (all ValueErrors)."""
    _check_model(cmd.model)
    cmd.calibration_shape()
    recipe = _recipe(cmd)
    target = get_target("onnx")
    options = target.build_options(cmd.options())
    _, passes = lowering_passes(recipe, options, decode_step=not cmd.prefill_only)
    for name in cmd.disable:
        if not any(DisablePasses([name]).matches(p) for p in passes):
            hint = " (a pattern matches equivalence passes only)" if is_pattern(name) else ""
            names = ", ".join(p.name for p in passes)
            raise ExportError(
                f"--disable-pass {name!r} matches no pass of this export{hint}; passes: {names}"
            )
    return ExportPlan(recipe, passes)


def _check_model(name: str) -> None:
    """A packaged model name, or a local model :func:`qcompile.tools.models.load_local` reads."""
    from qcompile.tools.models import local_model_error

    if name in MODELS:
        return
    reason = local_model_error(name)
    if reason is not None:
        raise ExportError(
            f"unknown model {name!r}: not a packaged model ({', '.join(MODELS)}) and not a local model "
            f"folder or .gguf file ({reason})"
        )


def load_causal_lm(name: str) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): a packaged model by name, or a local Hugging Face folder / GGUF file."""
    from qcompile.tools import models

    _check_model(name)
    if name == "smollm2":
        return models.load_smollm2()
    if name == "tiny-llama":
        return models.tiny_llama(), models.ByteTokenizer()
    return models.load_local(name)


def run_export(cmd: ExportCommand) -> Export:
    """Export as ``cmd`` says (checked by :func:`plan_export` first, before the model loads)."""
    plan = plan_export(cmd)
    model, tok = load_causal_lm(cmd.model)
    calibration = None
    if plan.recipe.needs_calibration():
        from qcompile.tools.data import calibration_windows

        if tok is None:
            raise ExportError(
                f"recipe {plan.recipe.name!r} calibrates on WikiText-2 text, and {cmd.model} has no "
                "tokenizer files; add them to the folder or choose a recipe without calibration"
            )
        calibration = calibration_windows(tok, *cmd.calibration_shape())
    kwargs = {
        "recipe": plan.recipe,
        "calibration": calibration,
        "options": cmd.options(),
        "instruments": cmd.instruments(),
    }
    if not cmd.prefill_only:
        return export_decoder(model, cmd.out, **kwargs)
    if tok is None:
        raise ExportError(f"--prefill-only needs example text, and {cmd.model} has no tokenizer files")
    example = (tok("qcompile exports this sentence.", return_tensors="pt")["input_ids"].repeat(2, 1),)
    return export_prefill(model, example, cmd.out, **kwargs)


__all__ = [
    "Export",
    "ExportCommand",
    "ExportError",
    "export_decoder",
    "export_prefill",
    "load_causal_lm",
    "plan_export",
    "quantize_decoder",
    "run_export",
]
