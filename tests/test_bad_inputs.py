"""The bad-input catalogue: each input gets a clear error naming the pass (and node) and the reason,
and the caller's model is bit-identical afterwards (its state dict hashed before and after)."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

import qcompile
from qcompile.errors import PassError
from qcompile.frontend.capture import CaptureError


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


IDS = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


def test_nan_weight_is_refused_before_anything_is_quantized(tiny_model):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    before = _digest(model)
    with pytest.raises(
        PassError,
        match=r"annotate at node `\w+`: the weight `model.layers.0.mlp.down_proj.weight` holds 1 NaN",
    ):
        qcompile.quantize(model, "w4a16-rtn", example_inputs=(IDS,), progress=False)
    assert _digest(model) == before


def test_empty_calibration_is_refused(tiny_decoder):
    layout = tiny_decoder.info["decoder"]
    with pytest.raises(PassError, match=r"calibrate: the calibration data is empty \(0 batches\)"):
        qcompile.quantize(
            tiny_decoder,
            "w8a8-smoothquant",
            example_inputs=(IDS, layout.empty(1)),
            calibration=[],
            progress=False,
        )


def test_calibration_of_the_wrong_dtype_names_the_pass_and_node(tiny_model):
    before = _digest(tiny_model)
    with pytest.raises(PassError, match=r"(?s)calibrate: failed: .*indices.*Long, Int.*%embedding"):
        qcompile.quantize(
            tiny_model,
            "w8a8-smoothquant",
            example_inputs=(IDS,),
            calibration=[torch.randn(1, 16)],
            progress=False,
        )
    assert _digest(tiny_model) == before


def test_inputs_of_the_wrong_dtype_fail_capture_clearly(tiny_model):
    with pytest.raises(CaptureError, match=r"capture: torch.export failed on LlamaForCausalLM: .*indices"):
        qcompile.capture(tiny_model, (IDS.float(),))


def test_a_model_in_training_mode_is_captured_in_eval_mode_and_left_training(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    before = _digest(model)
    qgraph = qcompile.capture(model, (IDS,))
    with torch.no_grad():
        torch.testing.assert_close(qgraph(IDS).logits, tiny_model(IDS).logits, rtol=0, atol=0)
    assert model.training and _digest(model) == before
