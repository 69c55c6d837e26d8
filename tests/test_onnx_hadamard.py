"""ONNX translation of the online ``qcompile::hadamard`` (QuaRot's R4): every plan kind through ORT,
and a rotated tiny Llama decoder exported and run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.backends.onnx import ExportOptions, OrtDecoder, make_session, run_flat
from qcompile.frontend.decoder import capture_decoder
from qcompile.ops.hadamard import hadamard_op_call_args
from qcompile.quant.hadamard import hadamard_transform, online_plan, plan_matrix
from qcompile.tools.export import export_decoder
from qcompile.tools.models import tiny_llama


class OnlineRotation(torch.nn.Module):
    """``linear(hadamard(x))``: the op between two ordinary nodes, as the rotate pass leaves it."""

    def __init__(self, n: int, allow_padding: bool) -> None:
        super().__init__()
        self.plan = online_plan(n, allow_padding=allow_padding)
        self.args = hadamard_op_call_args(self.plan)
        self.proj = torch.nn.Linear(self.plan.out_features, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.ops.qcompile.hadamard(x, *self.args))


@pytest.mark.parametrize(
    ("n", "allow_padding", "kind"),
    [
        (48, False, "exact"),  # 12 · 4: the K-matrix and the Sylvester factor both used
        (64, False, "exact"),  # 2^6: Sylvester only
        (36, False, "exact"),  # K = 36 itself (SmolLM2's 576 = 36 · 16 uses this K)
        (9 * 8, False, "exact"),  # 72 = 36 · 2
        (45, False, "identity"),  # no Hadamard of 45 nor of any divisor > 1: R4 leaves it alone
        (13 * 4, False, "exact"),  # 52 = K 52
        (26, False, "block_diagonal"),  # 26 = 2 · 13: blocks of 2
        (26, True, "padded"),  # padded to 28
    ],
)
def test_hadamard_plans_match_torch_through_ort(tmp_path: Path, n: int, allow_padding: bool, kind: str):
    model = OnlineRotation(n, allow_padding).eval()
    got_kind = "identity" if model.plan.is_identity else model.plan.kind
    assert got_kind == kind, model.plan.description
    x = torch.randn(2, 5, n, generator=torch.Generator().manual_seed(n))
    qg = qcompile.capture(model, (x,))
    path = tmp_path / "h.onnx"
    qcompile.lower(qg, "onnx", sample_inputs=[(x,)]).save(path)
    onnx.checker.check_model(str(path))
    x2 = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(n + 1))  # other batch and length
    (got,) = run_flat(make_session(path), [x2])
    ref = model(x2).detach().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    # and the op's own semantics, not just the composition: the transform alone vs the dense plan
    assert torch.allclose(
        hadamard_transform(x2.double(), model.plan),
        x2.double() @ plan_matrix(model.plan),
        atol=1e-12,
    )


def test_hadamard_export_uses_small_factors_not_the_dense_matrix(tmp_path: Path):
    """1536 = 12 · 128 (SmolLM2's down_proj input): two constants of 12² and 128² floats, not 1536²."""
    model = OnlineRotation(1536, False).eval()
    x = torch.randn(1, 3, 1536)
    path = tmp_path / "h1536.onnx"
    qcompile.lower(qcompile.capture(model, (x,)), "onnx", sample_inputs=[(x,)]).save(path)
    proto = onnx.load(str(path))
    sizes = sorted(
        int(np.prod(a.t.dims))
        for node in proto.graph.node
        if node.op_type == "Constant"
        for a in node.attribute
        if a.name == "value" and len(a.t.dims) == 2
    ) + sorted(int(np.prod(i.dims)) for i in proto.graph.initializer if len(i.dims) == 2)
    assert 1536 * 1536 not in sizes
    assert 128 * 128 in sizes and 12 * 12 in sizes
    (got,) = run_flat(make_session(path), [x])
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-5)


ROTATE_ONLY = {
    "recipe": {"name": "rotate-only", "description": "fuse norms, R1 + R2 + online R4; no quantizer"},
    "passes": [
        {"name": "analyze"},
        {"name": "fuse_norms"},
        {"name": "rotate", "r1": True, "r2": True, "r4": True},
    ],
}


@pytest.mark.parametrize(("recipe", "tolerance"), [(ROTATE_ONLY, 1e-5), ("w4a4-quarot", 6e-2)])
def test_rotated_decoder_exports_and_matches_reference(tmp_path: Path, recipe, tolerance):
    """QuaRot's graph (online R4 before every down_proj) through ORT: float rotation exact to fp32
    rounding; W4A4 within the per-scheme tolerance of tests/test_onnx_export.py (a 4-bit activation
    step is absmax / 7.5: an ulp upstream can flip a rounding)."""
    model = tiny_llama()
    decoder = capture_decoder(model)
    layout = decoder.info["decoder"]
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 256, (1, 32), generator=gen) for _ in range(4)]
    path = tmp_path / "rot.onnx"
    exp = export_decoder(
        model,
        path,
        recipe=recipe,
        qgraph=decoder,
        calibration=calibration,
        options=ExportOptions(accuracy_level=1),
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert not any(n.domain == "qcompile" for n in proto.graph.node)
    ids = torch.randint(0, 256, (2, 7), generator=gen)
    ref, _ = exp.qgraph(ids, layout.empty(2))
    dec = OrtDecoder(path)
    logits, _ = dec.step(ids, dec.empty_cache(2))
    rel = float(np.linalg.norm(logits - ref.numpy()) / np.linalg.norm(ref.numpy()))
    assert rel < tolerance, rel
