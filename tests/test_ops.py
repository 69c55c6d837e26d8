"""The qcompile:: custom ops: reference math, ragged groups, fake impls, torch.export round trip."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qcompile import ops

Q = torch.ops.qcompile


def _expand_by_hand(param: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """Column j uses group j // g: written as a loop, independent of repeat_interleave."""
    return torch.stack([param[..., j // group_size] for j in range(n)], dim=-1)


@pytest.mark.parametrize(("n", "g", "groups"), [(576, 128, 5), (48, 32, 2), (64, 16, 4), (40, 64, 1)])
def test_grouped_quantize_dequantize_match_reference(n, g, groups):
    gen = torch.Generator().manual_seed(n + g)
    x = torch.randn(6, n, generator=gen) * 3
    scale = torch.rand(6, groups, generator=gen) * 0.5 + 0.05
    zp = torch.randint(-3, 4, (6, groups), generator=gen, dtype=torch.int8)
    s_full, z_full = _expand_by_hand(scale, g, n), _expand_by_hand(zp, g, n).float()
    expected_q = torch.clamp(torch.round(x / s_full) + z_full, -8, 7).to(torch.int8)
    q = Q.quantize(x, scale, zp, -8, 7, g)
    assert q.dtype == torch.int8 and torch.equal(q, expected_q)
    deq = Q.dequantize(q, scale, zp, g)
    assert deq.dtype == torch.float32
    torch.testing.assert_close(deq, (expected_q.float() - z_full) * s_full, rtol=0, atol=0)


def test_ragged_last_group_of_576_is_64_wide():
    """576 = 4·128 + 64: columns 512..575 use the fifth scale; no padding column exists."""
    scale = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    q = torch.ones(1, 576, dtype=torch.int8)
    deq = Q.dequantize(q, scale, torch.zeros(1, 5, dtype=torch.int8), 128)
    assert deq.shape == (1, 576)
    assert torch.equal(deq[0, 512:], torch.full((64,), 5.0)) and torch.equal(
        deq[0, 384:512], torch.full((128,), 4.0)
    )


def test_groups_must_cover_the_channels():
    with pytest.raises(ValueError, match="do not cover"):
        Q.dequantize(
            torch.zeros(2, 576, dtype=torch.int8), torch.ones(2, 4), torch.zeros(2, 4, dtype=torch.int8), 128
        )


def test_per_channel_and_per_tensor_broadcast():
    x = torch.randn(4, 10)
    s_row, z_row = torch.rand(4, 1) + 0.1, torch.zeros(4, 1, dtype=torch.int8)
    assert torch.equal(
        Q.quantize(x, s_row, z_row, -128, 127, 0), torch.round(x / s_row).clamp(-128, 127).to(torch.int8)
    )
    s0, z0 = torch.tensor(0.02), torch.tensor(3, dtype=torch.int8)
    q = Q.quantize(x, s0, z0, -128, 127, 0)
    assert torch.equal(q, (torch.round(x / 0.02) + 3).clamp(-128, 127).to(torch.int8))
    assert torch.equal(Q.dequantize(q, s0, z0, 0), (q.float() - 3) * s0)


def test_dequantize_returns_the_scale_dtype():
    q = torch.randint(-8, 8, (3, 32), dtype=torch.int8)
    out = Q.dequantize(
        q, torch.full((3, 1), 0.5, dtype=torch.bfloat16), torch.zeros(3, 1, dtype=torch.int8), 0
    )
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("symmetric", [True, False])
def test_choose_qparams_per_token(symmetric):
    x = torch.randn(2, 5, 24)
    x[0, 1] = 0.0  # a zero row must not divide by zero
    x[1, 2] = x[1, 2].abs() + 0.1  # an all-positive row: the asymmetric range still contains 0
    scale, zp = Q.choose_qparams_per_token(x, -128, 127, symmetric)
    assert scale.shape == zp.shape == (2, 5, 1)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int8
    assert scale[0, 1, 0] == 1.0
    if symmetric:
        absmax = x.abs().amax(-1, keepdim=True)
        nonzero = absmax > 0
        torch.testing.assert_close(scale[nonzero], (absmax / 127.5)[nonzero])
        assert (zp == 0).all()
    else:
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True).clamp(min=0)
        nonzero = (hi - lo) > 0
        torch.testing.assert_close(scale[nonzero], ((hi - lo) / 255)[nonzero])
        assert zp[1, 2, 0] == -128  # min clamped to 0 maps to qmin
    deq = Q.dequantize(Q.quantize(x, scale, zp, -128, 127, 0), scale, zp, 0)
    assert torch.equal(deq[0, 1], torch.zeros(24))
    assert ((deq - x).abs() <= scale / 2 + 1e-6 * x.abs()).all()  # half a step, plus float rounding


def test_fake_impls_give_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(3, 7, 576, dtype=torch.bfloat16)
        scale, zp = Q.choose_qparams_per_token(x, -8, 7, True)
        assert (scale.shape, scale.dtype, zp.shape, zp.dtype) == (
            (3, 7, 1),
            torch.bfloat16,
            (3, 7, 1),
            torch.int8,
        )
        q = Q.quantize(x, scale, zp, -8, 7, 0)
        assert (q.shape, q.dtype) == ((3, 7, 576), torch.int8)
        deq = Q.dequantize(
            q, torch.empty(576 // 64, dtype=torch.float16), torch.empty(9, dtype=torch.int8), 64
        )
        assert (deq.shape, deq.dtype) == ((3, 7, 576), torch.float16)


def test_opcheck():
    """torch.library.opcheck: schema, autograd registration, fake impl vs real, AOT dispatch (dynamic)."""
    x = torch.randn(4, 48)
    scale, zp = torch.rand(4, 2) + 0.1, torch.zeros(4, 2, dtype=torch.int8)
    q = Q.quantize(x, scale, zp, -8, 7, 32)
    for op, args in (
        (ops.QUANTIZE, (x, scale, zp, -8, 7, 32)),
        (ops.DEQUANTIZE, (q, scale, zp, 32)),
        (ops.CHOOSE_QPARAMS_PER_TOKEN, (x, -128, 127, False)),
    ):
        torch.library.opcheck(op, args)


class _QDQLinear(torch.nn.Module):
    """A W4 g32 weight dequantize plus a per-token int8 QDQ on the input, as the quantize pass emits."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("q", torch.randint(-8, 8, (16, 48), dtype=torch.int8))
        self.register_buffer("scale", torch.rand(16, 2) * 0.1 + 0.01)
        self.register_buffer("zp", torch.zeros(16, 2, dtype=torch.int8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = Q.dequantize(self.q, self.scale, self.zp, 32)
        s, z = Q.choose_qparams_per_token(x, -128, 127, True)
        xq = Q.dequantize(Q.quantize(x, s, z, -128, 127, 0), s, z, 0)
        return torch.nn.functional.linear(xq, w)


def test_ops_survive_torch_export_with_dynamic_shapes():
    mod = _QDQLinear()
    x = torch.randn(2, 5, 48)
    dims = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    ep = torch.export.export(mod, (x,), dynamic_shapes=({**dims},), strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert all(op in targets for op in ops.QUANT_OPS)
    for node in ep.graph.nodes:
        if node.target is ops.QUANTIZE:
            assert node.meta["val"].dtype == torch.int8 and node.meta["val"].shape[-1] == 48
        if node.target is ops.DEQUANTIZE and node.args[-1] == 32:
            assert tuple(node.meta["val"].shape) == (16, 48)
    x2 = torch.randn(3, 9, 48)  # other batch and sequence than the example
    torch.testing.assert_close(ep.module()(x2), mod(x2), rtol=0, atol=0)


# ---- the registry ------------------------------------------------------------------------------------


def test_importing_qcompile_alone_defines_every_op() -> None:
    """A graph holding any qcompile op (attention included) runs after ``import qcompile`` alone."""
    import subprocess
    import sys

    code = (
        "import torch, qcompile\n"
        "names = sorted(qcompile.ops.OPS)\n"
        "assert all(hasattr(torch.ops.qcompile, n) for n in names), names\n"
        "import sys; assert not any(m.startswith('qcompile.backends') for m in sys.modules)\n"
        "print(' '.join(names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == sorted(
        [
            "choose_qparams_per_token",
            "dequantize",
            "gqa_attention",
            "gqa_attention_int8kv",
            "hadamard",
            "qembedding",
            "qlinear_w",
            "qlinear_wa",
            "quantize",
        ]
    )


def test_registry_rows_point_at_the_ops_and_their_references() -> None:
    from qcompile.ops import registry

    for name, op in registry.OPS.items():
        assert op.overload is getattr(torch.ops.qcompile, name).default
        assert registry.implementation("reference", op.overload) is op.reference
        assert op.doc and op.module.startswith("qcompile.ops.")
    table = registry.coverage_table()
    assert all(f"`qcompile::{name}`" in table for name in registry.OPS)
    with pytest.raises(ValueError, match="defined twice"):
        registry.define("quantize", "(Tensor x) -> Tensor")(lambda x: x)
    with pytest.raises(KeyError, match="unknown op qcompile::nope"):
        registry.implementation("onnx", "nope")
    with pytest.raises(KeyError, match="backend 'nobody' has no implementation of qcompile::quantize"):
        registry.implementation("nobody", "quantize")
