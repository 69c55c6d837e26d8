"""What ``qcompile export-onnx`` does, callable without argparse (the CLI only parses flags).

Default: the decode step with its KV cache (:func:`export_decoder`), so the file runs a generation
loop. ``prefill_only`` exports the plain captured forward instead (``input_ids -> logits`` for every
position, no cache) — for encoders or for scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcompile.backends.onnx.decoder_export import export_decoder
from qcompile.backends.onnx.export import ExportOptions, ExportReport, export_onnx
from qcompile.backends.onnx.head import HeadQuantOptions, format_head_report, quantize_head
from qcompile.pipeline.recipe import Recipe, load_recipe


@dataclass
class ExportCommand:
    """One export: model name, recipe, output path and the knobs of the CLI."""

    model: str = "smollm2"
    recipe: str = "w4a16-rtn"
    out: str = "model.onnx"
    accuracy_level: int = 4
    int4_format: str = "matmulnbits"
    lm_head_bits: int | None = None
    embedding_bits: int | None = None
    head_group_size: int = 64
    prefill_only: bool = False
    calib_windows: int = 32
    calib_len: int = 512
    kv_cache_bits: int | None = None  # 8: append quantize_kv (int8 KV cache) unless the recipe has it
    fuse_attention: bool = True  # decode step: one GroupQueryAttention per layer (see .attention)
    ort_rewrites: bool = True  # packed projections, fusable RMSNorm, shared KV buffer (see .optimize)

    def head(self) -> HeadQuantOptions | None:
        if self.lm_head_bits is None and self.embedding_bits is None:
            return None
        return HeadQuantOptions(self.lm_head_bits, self.embedding_bits, self.head_group_size)


def load_causal_lm(name: str) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for the models the CLI knows."""
    from qcompile.tools import models

    if name == "smollm2":
        return models.load_smollm2()
    if name == "tiny-llama":
        return models.tiny_llama(), models.ByteTokenizer()
    raise SystemExit(f"qcompile export-onnx: unknown model {name!r}; choose smollm2 or tiny-llama")


def _recipe(cmd: ExportCommand) -> Recipe:
    """The recipe to run: ``cmd.recipe``, with ``quantize_kv`` appended for ``--kv-cache-bits``."""
    recipe = load_recipe(cmd.recipe)
    if cmd.kv_cache_bits is None or "quantize_kv" in recipe.pass_names():
        return recipe
    return recipe.appended("quantize_kv", {"bits": cmd.kv_cache_bits}, suffix=f"+kv{cmd.kv_cache_bits}")


def _calibration(recipe: Recipe, cmd: ExportCommand, tokenizer: Any) -> list[torch.Tensor] | None:
    from qcompile.tools.data import calibration_windows

    if not recipe.needs_calibration():
        return None
    return calibration_windows(tokenizer, cmd.calib_windows, cmd.calib_len)


def run_export(cmd: ExportCommand) -> tuple[ExportReport, str]:
    """Export as ``cmd`` says; returns the report and the quantization summary."""
    model, tok = load_causal_lm(cmd.model)
    recipe = _recipe(cmd)
    calibration = _calibration(recipe, cmd, tok)
    options = ExportOptions(
        accuracy_level=cmd.accuracy_level,
        int4_format=cmd.int4_format,
        fuse_attention=cmd.fuse_attention,
    ).with_ort_rewrites(cmd.ort_rewrites)
    Path(cmd.out).parent.mkdir(parents=True, exist_ok=True)
    if not cmd.prefill_only:
        exp = export_decoder(
            model, cmd.out, recipe=recipe, calibration=calibration, options=options, head=cmd.head()
        )
        return exp.report, exp.quantize_summary
    import qcompile

    example = (tok("qcompile exports this sentence.", return_tensors="pt")["input_ids"].repeat(2, 1),)
    batches = [(w,) for w in calibration] if calibration is not None else None
    qm = qcompile.quantize(model, recipe, calibration=batches, example_inputs=example, progress=False)
    summary = qm.summary()
    if cmd.head() is not None:
        summary += "\n" + format_head_report(quantize_head(qm.qgraph, cmd.head()))
    return export_onnx(qm.qgraph, example, cmd.out, options=options), summary
