"""Every shipped recipe exports to an ONNX decode step that passes ``onnx.checker`` and runs in ONNX
Runtime with the reference QGraph's logits (tiny Llama, accuracy level 1 so MatMulNBits keeps fp32
activations, exactly the reference's W4A16 semantics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qcompile.backends.onnx import ExportOptions, OrtDecoder
from qcompile.frontend.decoder import capture_decoder
from qcompile.pipeline.recipe import list_recipes, load_recipe
from qcompile.tools.export import export_decoder
from qcompile.tools.models import tiny_llama


def _tolerance(recipe: str) -> float:
    """Relative L2 error of the logits allowed per activation width. Float activations: fp32
    rounding only. Quantized activations: an ulp of difference upstream (ORT's fused kernels sum in
    another order) can flip one rounding of a per-token quantizer, and 30 roundings compound; the
    bounds are those of tests/test_onnx_export.py's per-scheme parity (measured W8A8 ~1e-3, W4A4 ~3e-2).
    An int8 KV cache (``kv_cache_bits = 8``) is an 8-bit activation quantizer too: on tiny Llama an ulp of
    MatMulNBits flips one int8 value of layer 0's values (measured 8.5e-4 on the logits)."""
    passes = {p.name: p for p in load_recipe(recipe).passes}
    spec = passes.get("annotate")
    if spec is None or spec.options.get("act_mode", "dynamic_per_token") == "none":
        return 2e-2 if spec is not None and spec.options.get("kv_cache_bits") else 1e-4
    return 6e-2 if spec.options.get("act_bits", 8) <= 4 else 2e-2


@pytest.fixture(scope="module")
def model_and_decoder():
    model = tiny_llama()
    return model, capture_decoder(model)


def _fits_tiny_llama(name: str) -> bool:
    """False for a recipe whose overrides name layers tiny Llama (2 layers) lacks: it is tuned for
    SmolLM2 (``w4a16-smoothquant+-gptq-mixed``: layer 11) and annotate refuses it here;
    ``TINY_MIXED`` is its tiny-sized form."""
    annotate = [p for p in load_recipe(name).passes if p.name == "annotate"]
    layers = [n for p in annotate for o in p.options.get("overrides", []) for n in o.get("layers", [])]
    return all(n < 2 for n in layers)


_mixed = load_recipe("w4a16-smoothquant+-gptq-mixed").to_dict()
_mixed["recipe"]["name"] += "-tiny"
for _override in _mixed["passes"][1]["overrides"]:
    if "layers" in _override:
        _override["layers"] = [1]
TINY_MIXED = _mixed


@pytest.mark.parametrize(
    "recipe",
    [*(n for n in list_recipes() if _fits_tiny_llama(n)), pytest.param(TINY_MIXED, id="mixed-tiny")],
)
def test_every_recipe_exports_checks_and_matches(model_and_decoder, tmp_path: Path, recipe: str | dict):
    model, decoder = model_and_decoder
    layout = decoder.info["decoder"]
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 256, (1, 32), generator=gen) for _ in range(4)]
    path = tmp_path / f"{load_recipe(recipe).name}.onnx"
    exp = export_decoder(
        model,
        path,
        recipe=recipe,
        qgraph=decoder,
        calibration=calibration,
        options=ExportOptions(accuracy_level=1),
    )
    onnx.checker.check_model(str(path))
    assert not any(n.domain == "qcompile" for n in onnx.load(str(path)).graph.node)
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    ref, ref_past = exp.qgraph(ids, layout.empty(2))
    dec = OrtDecoder(path)
    logits, past = dec.step(ids, dec.empty_cache(2))
    nxt = torch.tensor([[3], [4]])
    ref_step, _ = exp.qgraph(nxt, ref_past)
    step, _ = dec.step(nxt, past)
    tol = _tolerance(recipe)
    for got, want in ((logits, ref), (step, ref_step)):
        want = want.numpy()
        rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert rel < tol, (recipe, rel)
