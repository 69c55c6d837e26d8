"""The fuse_norms pass: norm γ (and β) folded into the readers, weightless norms, LayerNorm streams centred."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile.pipeline.instruments import EquivalenceCheck
from qcompile.tools.models import tiny_bert, tiny_llama

# fp32 graphs, merges in float64: folding moves outputs by one rounding of each changed weight.
EQUIV_RTOL = 1e-5


class PreLNBlock(nn.Module):
    """GPT-2/OPT-style block: pre-LayerNorm attention and GELU MLP, every linear with a bias."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).view(b, s, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PreLN(nn.Module):
    """Token + position embeddings, two pre-LN blocks, final LayerNorm, lm_head tied to the tokens."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, ff: int = 64, layers: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(128, d)
        self.blocks = nn.ModuleList(PreLNBlock(d, heads, ff) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() == 1 else 0.3))
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.add_(1.0)  # γ ≈ 1 ± 0.2, β ≈ ±0.2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


@pytest.fixture(scope="module")
def llama():
    """tiny_llama and its capture, shared (quantize never modifies a QGraph it is given)."""
    model = tiny_llama()
    return model, qcompile.capture(model, (torch.randint(0, 256, (2, 16)),))


def _fuse(model, batches, passes=("analyze", "fuse_norms")):
    check = EquivalenceCheck(default_tolerance=EQUIV_RTOL)
    recipe = {"recipe": {"name": "t"}, "passes": list(passes)}
    qm = qcompile.quantize(model, recipe, calibration=batches, instruments=[check], progress=False)
    return qm, qm.report("fuse_norms")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def test_tiny_llama_norms_become_weightless_and_readers_absorb_gamma(llama):
    model, qg = llama
    batches = [(torch.randint(0, 256, (1, 24)),) for _ in range(2)]
    qm, report = _fuse(qg, batches)
    assert report["equivalence_check"]["passed"] and report["equivalence_check"]["max_error"] < EQUIV_RTOL
    assert len(report["fused"]) == 5 and report["not_fused"] == []
    st = qm.qgraph.info["structure"]
    assert all(n.kind == "rms_norm" and n.weight is None and n.bias is None for n in st.norms.values())
    # q's columns carry the input norm's γ now: W diag(γ).
    layer0 = model.model.layers[0]
    q_weight = qm.qgraph.get_constant(st.linears[st.attentions[0].q].weight)
    expected = layer0.self_attn.q_proj.weight * layer0.input_layernorm.weight
    torch.testing.assert_close(q_weight, expected, rtol=1e-6, atol=1e-7)
    # The final norm's γ went into lm_head, which had to be untied from the embedding first.
    assert not st.tied_embedding
    head = qm.qgraph.get_constant(st.linears[st.lm_head].weight)
    emb = qm.qgraph.get_constant(st.embeddings[0].weight)
    torch.testing.assert_close(emb, model.model.embed_tokens.weight)
    torch.testing.assert_close(head, model.lm_head.weight * model.model.norm.weight, rtol=1e-6, atol=1e-7)
    assert any("lm_head" in u for f in report["fused"] for u in f["untied"])
    x = torch.randint(0, 256, (2, 17))
    ref = model(x).logits
    assert (qm(x).logits - ref).abs().max() / ref.abs().max() < EQUIV_RTOL


def test_calibration_statistics_follow_the_fold(llama):
    """After fusing, the readers see x/γ: the rescaled statistics equal a fresh calibration's."""
    _, qg = llama
    batches = [(torch.randint(0, 256, (1, 16)),) for _ in range(2)]
    qm, _ = _fuse(qg, batches, ("analyze", "calibrate", "fuse_norms"))
    moved = qm.pipeline.results[-1][1].qgraph
    fresh, _ = _fuse(qg, batches, ("analyze", "fuse_norms", "calibrate"))
    ours = qcompile.ir.keys.get(moved.node("linear_4"))["act_stats"]
    theirs = qcompile.ir.keys.get(fresh.qgraph.node("linear_4"))["act_stats"]
    torch.testing.assert_close(ours.channel_absmax, theirs.channel_absmax, rtol=1e-5, atol=1e-6)


def test_zero_gamma_channels_are_folded_exactly():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[[2, 7]] = 0.0
    batches = [(torch.randint(0, 256, (1, 16)),)]
    qm, report = _fuse(model, batches)
    assert report["equivalence_check"]["passed"]
    assert sorted(f["zero_gamma_channels"] for f in report["fused"]) == [0, 0, 0, 0, 2]
    st = qm.qgraph.info["structure"]
    gate = st.linears[st.mlps[1].gate]
    assert bool((qm.qgraph.get_constant(gate.weight)[:, [2, 7]] == 0).all())


def test_pre_ln_layer_norm_model_is_centred_and_rewritten_as_rms_norm():
    model = PreLN().eval()
    batches = [(torch.randint(0, 64, (2, 12)),)]
    qm, report = _fuse(model, batches)
    assert report["equivalence_check"]["passed"], report["equivalence_check"]
    assert all(f["beta_to_bias"] for f in report["fused"]) and len(report["fused"]) == 5
    centring = report["centring"]
    assert centring["centred"] and sorted(centring["embeddings"]) == ["embedding", "embedding_1"]
    assert len(centring["writers"]) == 4 and len(centring["layer_norm_to_rms_norm"]) == 5
    st = qm.qgraph.info["structure"]
    assert [n.kind for n in st.norms.values()] == ["rms_norm"] * 5
    assert all(n.weight is None and n.bias is None for n in st.norms.values())
    # lm_head had no bias: the final β folded into a new one; the token table is mean-free per row.
    assert st.linears[st.lm_head].bias is not None
    table = qm.qgraph.get_constant(st.embeddings[0].weight)
    assert float(table.mean(-1).abs().max()) < 1e-6
    x = torch.randint(0, 64, (3, 10))
    ref = model(x)
    assert (qm(x) - ref).abs().max() / ref.abs().max() < EQUIV_RTOL


def test_post_ln_bert_reports_what_cannot_be_fused():
    model = tiny_bert()
    batches = [(torch.randint(0, 256, (2, 12)),)]
    qm, report = _fuse(model, batches)
    assert report["equivalence_check"]["max_error"] == 0.0
    assert report["fused"] == [] and len(report["not_fused"]) == 5
    for n in report["not_fused"]:
        assert n["reason"].startswith("post-LN") and "residual add" in n["reason"]
    assert not report["centring"]["centred"] and "post-LN" in report["centring"]["reason"]
    assert "R1" in report["centring"]["reason"]


def test_fuse_norms_needs_the_analysis():
    from qcompile.pipeline.recipe import RecipeError, load_recipe

    with pytest.raises(
        RecipeError, match="'fuse_norms' requires a structural analysis .*; run analyze earlier"
    ):
        load_recipe({"recipe": {"name": "t"}, "passes": ["fuse_norms"]})
