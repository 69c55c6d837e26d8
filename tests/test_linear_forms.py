"""Every linear form is a linear: ``mm`` / ``addmm`` layers (GPT-2's ``Conv1D``, ``x @ W``,
``x @ W.t()``) are captured as ``aten.linear`` with bit-identical outputs and quantized like any other
linear; a product the compiler cannot take as a linear is named, never silently left float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile.errors import PassError

aten = torch.ops.aten


class _Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], ``addmm(b, x2d, W)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class _Forms(nn.Module):
    """One of each form; ``shared`` is read as ``x @ W`` and as a plain buffer elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = _Conv1D(16, 24)
        self.w_t = nn.Parameter(torch.randn(24, 32) / 5)  # used as x @ W  (W stored [in, out])
        self.w_out_in = nn.Parameter(torch.randn(16, 32) / 5)  # used as x @ W.t() (W stored [out, in])
        self.shared = nn.Parameter(torch.randn(16, 16) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = h.reshape(-1, 24) @ self.w_t
        h = torch.mm(h, self.w_out_in.t())
        return (h @ self.shared + self.shared.sum()).view(*x.shape[:-1], 16)


def _targets(qgraph) -> list:
    return [n.target for n in qgraph.graph.nodes if n.op == "call_function"]


def test_mm_and_addmm_layers_become_linears_with_identical_outputs():
    model = _Forms().eval()
    x = torch.randn(2, 5, 16)
    qg = qcompile.capture(model, (x,))
    targets = _targets(qg)
    assert targets.count(aten.linear.default) == 4
    assert aten.addmm.default not in targets and aten.mm.default not in targets
    with torch.no_grad():
        # The same products; a [out, in] weight lets the BLAS sum in another order: float32
        # reassociation over K <= 32 terms, |error| <= K·eps·Σ|terms| (~4e-7 measured).
        torch.testing.assert_close(qg(x), model(x), rtol=2e-6, atol=1e-6)
    # the [in, out] weights were transposed into [out, in] constants; the shared one was not replaced
    weights = {
        n.args[1].target: qg.get_constant(n.args[1]).shape
        for n in qg.graph.nodes
        if n.target is aten.linear.default
    }
    assert weights["conv.weight"] == (24, 16) and weights["w_out_in"] == (16, 32)
    assert weights["w_t"] == (32, 24) and weights["shared_linear"] == (16, 16)
    torch.testing.assert_close(qg.get_constant("shared"), model.shared.detach(), rtol=0, atol=0)
    assert model.conv.weight.shape == (16, 24)  # the caller's module is untouched


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval()


class _FusedQKV(nn.Module):
    """One projection cut three ways with unequal widths (GQA: q 32, k 16, v 16), as split_with_sizes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(16, 64)
        self.out = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([32, 16, 16], dim=-1)
        return self.out(q[..., :16] * k + v)


def test_fused_projection_is_cut_into_one_linear_per_chunk():
    model = _FusedQKV().eval()
    x = torch.randn(2, 5, 16)
    qg = qcompile.capture(model, (x,))
    linears = [n for n in qg.graph.nodes if n.target is aten.linear.default]
    assert [qg.get_constant(n.args[1]).shape[0] for n in linears] == [32, 16, 16, 16]
    assert not any(n.target in (aten.split.Tensor, aten.split_with_sizes.default) for n in qg.graph.nodes)
    torch.testing.assert_close(
        qg.get_constant(linears[1].args[1]), model.qkv.weight.detach()[32:48], rtol=0, atol=0
    )
    with torch.no_grad():
        torch.testing.assert_close(qg(x), model(x), rtol=2e-6, atol=1e-6)  # the same dot products


def test_gpt2_conv1d_model_is_analysed_and_quantized(gpt2):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    qg = qcompile.capture(gpt2, (ids,))
    # c_attn cut into q, k, v: (3 + 1 + 2) linears per block × 2 + lm_head
    assert _targets(qg).count(aten.linear.default) == 13
    with torch.no_grad():
        torch.testing.assert_close(qg(ids).logits, gpt2(ids).logits, rtol=0, atol=0)
    qm = qcompile.quantize(qg, "w4a16-rtn", example_inputs=(ids,), progress=False)
    st = qm.qgraph.info["structure"]
    roles = sorted((site.layer, site.role) for site in st.linears.values() if site.layer is not None)
    assert roles == sorted((layer, r) for layer in (0, 1) for r in ("q", "k", "v", "o", "fc1", "fc2"))
    assert [m.activation for m in st.mlps] == ["elementwise", "elementwise"]  # the written-out tanh-GELU
    annotate = qm.pipeline.result("annotate").report
    assert annotate["annotated"] == 12 and annotate["unrecognised"] == []
    assert annotate["excluded"][0]["role"] == "lm_head"  # the 9th stays float by the recipe's choice
    with torch.no_grad():
        diff = (qm.qgraph(ids).logits - gpt2(ids).logits).abs().max()
    assert 0 < diff < 1.0  # quantized: the numbers moved, by int4 rounding only


class _ConstantBmm(nn.Module):
    """A batched product with a constant: not a linear layer the compiler can quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.w)


def test_a_recipe_that_would_quantize_nothing_fails_loudly():
    x = torch.randn(2, 3, 8)
    with pytest.raises(
        PassError, match=r"annotate at node `bmm`: no linear to quantize, but 1 matrix products"
    ):
        qcompile.quantize(_ConstantBmm().eval(), "w8a8-rtn", example_inputs=(x,), progress=False)
