"""The equivalence engine: insert T·T⁻¹, absorb both halves, outputs unchanged; refuse where a half cannot go.

Tolerance (fp32 models, merges in float64): ``max|after − before| ≤ 1e-5 · max|before|`` (TOL below).
Every positive test also asserts that constants really changed, so a no-op engine cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qcompile
from qcompile.analysis.analyzer import analyze
from qcompile.equivalence import (
    EquivalenceError,
    LinearSource,
    Region,
    apply_diagonal,
    apply_orthogonal,
    apply_scaled_orthogonal,
    region_for_linear_pair,
    region_for_norm,
    region_for_up_down,
    region_for_v_o,
    residual_region,
)
from qcompile.tools.models import tiny_bert, tiny_llama

TOL = 1e-5  # max abs error relative to the output's scale (fp32)


# ---- hand-made graphs (no transformers) --------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm written the way transformers writes it (so the analysis sees the same ATen pattern)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


class NormMLP(nn.Module):
    """RMSNorm(γ) → fc1 → [act] → fc2: norm→linear and linear→linear regions."""

    def __init__(self, dim: int = 16, hidden: int = 24, act: nn.Module | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim, generator=gen))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        with torch.no_grad():
            for p in (*self.fc1.parameters(), *self.fc2.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) / dim**0.5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(rms_norm(x, self.weight))
        return self.fc2(self.act(y) if self.act is not None else y)


class WeightlessStream(nn.Module):
    """Embedding → blocks ``h + fc2(relu(fc1(rms(h))))`` with weightless RMSNorms → rms → lm_head: R1."""

    def __init__(
        self, vocab: int = 32, dim: int = 16, hidden: int = 24, layers: int = 2, seed: int = 0
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(layers))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for fc1, fc2 in zip(self.fc1, self.fc2, strict=True):
            h = h + fc2(torch.relu(fc1(rms_norm(h, None))))
        return self.lm_head(rms_norm(h, None))


def capture(model: nn.Module, example: torch.Tensor, dynamic: bool = True):
    qg = qcompile.capture(model, (example,), dynamic=dynamic)
    return qg, analyze(qg)


def log_uniform(n: int, gen: torch.Generator, lo: float = 1e-2, hi: float = 1e2) -> torch.Tensor:
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp(
        torch.log(torch.tensor(lo)) + u * (torch.log(torch.tensor(hi)) - torch.log(torch.tensor(lo)))
    )


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def output(qg, x: torch.Tensor) -> torch.Tensor:
    out = qg(x)
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out[0] if isinstance(out, (list, tuple)) else out


def assert_equivalent(before, after, x: torch.Tensor, report) -> None:
    ref, got = output(before, x), output(after, x)
    err = float((got - ref).abs().max())
    assert err <= TOL * float(ref.abs().max()), (
        f"max abs error {err:.3g} vs output scale {float(ref.abs().max()):.3g}"
    )
    assert report.changes, report.to_dict()
    for c in report.changes:  # the graph really reads the new values (all-zero biases stay zero)
        old = before.get_constant(c.original)
        if bool(old.ne(0).any()):
            assert c.max_abs_change > 0 and not torch.equal(after.get_constant(c.target), old), c


# ---- hand-made: norm → linear, linear → linear ------------------------------------------------------


@pytest.fixture(scope="module")
def norm_mlp():
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    return (*capture(NormMLP(), x), x)


def test_norm_to_linear_diagonal(norm_mlp):
    qg, st, x = norm_mlp
    after = qg.copy()
    norm = next(iter(st.norms))
    report = apply_diagonal(
        after, region_for_norm(after.info["structure"], norm), log_uniform(16, torch.Generator()), "smooth"
    )
    assert_equivalent(qg, after, x, report)
    assert sorted(c.roles[0] for c in report.changes) == ["consumer columns", "norm γ"]


@pytest.mark.parametrize("kind", ["diagonal", "orthogonal", "scaled_orthogonal"])
def test_linear_pair_all_kinds(norm_mlp, kind):
    qg, st, x = norm_mlp
    after = qg.copy()
    fc1, fc2 = sorted(st.linears)
    region = region_for_linear_pair(after.info["structure"], fc1, [fc2])
    gen = torch.Generator().manual_seed(2)
    s, q = log_uniform(24, gen), random_orthogonal(24, gen)
    if kind == "scaled_orthogonal":
        # diag(1/s)·Q mixes channels scaled by up to max(s)/min(s): the fp32 activations between the
        # two halves lose that factor in precision (it is conditioning, not the merge), so keep s mild.
        s = log_uniform(24, gen, 0.25, 4.0)
    if kind == "diagonal":
        report = apply_diagonal(after, region, s, "smooth")
    elif kind == "orthogonal":
        report = apply_orthogonal(after, region, q, "rotate")
    else:
        report = apply_scaled_orthogonal(after, region, s, q, "rotate")
    assert_equivalent(qg, after, x, report)
    assert {c.roles[0] for c in report.changes} == {"producer rows", "producer bias", "consumer columns"}


def test_relu_passes_positive_diagonal_only():
    x = torch.randn(2, 5, 16)
    qg, st = capture(NormMLP(act=nn.ReLU()), x)
    region = region_for_up_down(st, st.mlps[0])
    after = qg.copy()
    assert_equivalent(
        qg, after, x, apply_diagonal(after, region, log_uniform(24, torch.Generator()), "smooth")
    )
    s = -log_uniform(24, torch.Generator())
    with pytest.raises(EquivalenceError, match=r"`relu`.*s_j > 0"):
        apply_diagonal(qg.copy(), region, s, "smooth")
    with pytest.raises(EquivalenceError, match=r"`relu`"):
        apply_orthogonal(qg.copy(), region, random_orthogonal(24, torch.Generator()), "rotate")


class LayerNormLinear(nn.Module):
    """Pre-LN: LayerNorm(γ, β) → fc: a diagonal goes into γ and β (SmoothQuant on OPT/BLOOM)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim), nn.Linear(dim, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def test_layer_norm_gamma_and_beta_absorb_diagonal():
    x = torch.randn(2, 5, 16)
    qg, st = capture(LayerNormLinear(), x)
    after = qg.copy()
    (norm,) = st.norms
    report = apply_diagonal(
        after, region_for_norm(after.info["structure"], norm), log_uniform(16, torch.Generator()), "smooth"
    )
    assert_equivalent(qg, after, x, report)
    assert sorted(r for c in report.changes for r in c.roles) == ["consumer columns", "norm β", "norm γ"]


def test_gelu_in_path_refused():
    x = torch.randn(2, 5, 16)
    qg, st = capture(NormMLP(act=nn.GELU()), x)
    with pytest.raises(EquivalenceError, match=r"smooth: .*`gelu` \(aten.gelu.default\).*nonlinear") as exc:
        apply_diagonal(qg.copy(), region_for_up_down(st, st.mlps[0]), torch.full((24,), 2.0), "smooth")
    assert exc.value.node == "gelu" and exc.value.pass_name == "smooth"


def test_refusals_leave_the_graph_untouched(norm_mlp):
    qg, st, _ = norm_mlp
    after = qg.copy()
    with pytest.raises(EquivalenceError, match="only a diagonal map"):
        apply_orthogonal(
            after,
            region_for_norm(st, next(iter(st.norms))),
            random_orthogonal(16, torch.Generator()),
            "rotate",
        )
    for name, value in qg.graph_module.named_buffers():
        assert torch.equal(value, after.get_constant(name))


def test_bad_regions_and_transforms(norm_mlp):
    qg, st, _ = norm_mlp
    fc1, fc2 = sorted(st.linears)
    with pytest.raises(EquivalenceError, match=f"`{fc2}`.*not a sink"):
        apply_diagonal(qg.copy(), region_for_linear_pair(st, fc1, []), torch.ones(24), "smooth")
    unreached = Region("fc1 → fc2, fc1", [LinearSource(fc1)], [fc2, fc1], 24)
    with pytest.raises(EquivalenceError, match=f"`{fc1}`.*no source output reaches"):
        apply_diagonal(qg.copy(), unreached, torch.ones(24), "smooth")
    with pytest.raises(EquivalenceError, match="finite and non-zero"):
        apply_diagonal(qg.copy(), region_for_linear_pair(st, fc1, [fc2]), torch.zeros(24), "smooth")
    with pytest.raises(EquivalenceError, match="not orthogonal"):
        apply_orthogonal(qg.copy(), region_for_linear_pair(st, fc1, [fc2]), torch.randn(24, 24), "rotate")
    with pytest.raises(EquivalenceError, match="24 channels, the region 24, the transform 7"):
        apply_scaled_orthogonal(
            qg.copy(), region_for_linear_pair(st, fc1, [fc2]), torch.ones(7), torch.eye(7), "rotate"
        )


def test_residual_rotation_hand_made_stream():
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(3))
    qg, st = capture(WeightlessStream(), ids)
    after = qg.copy()
    report = apply_orthogonal(
        after, residual_region(after.info["structure"]), random_orthogonal(16, torch.Generator()), "rotate"
    )
    assert_equivalent(qg, after, ids, report)
    roles = {r for c in report.changes for r in c.roles}
    assert roles == {"embedding columns", "producer rows", "producer bias", "consumer columns"}
    with pytest.raises(EquivalenceError, match=r"RMSNorm .* divides each row"):
        apply_diagonal(qg.copy(), residual_region(st), log_uniform(16, torch.Generator()), "smooth")


# ---- tiny Llama (GQA, RoPE, tied embeddings) ---------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(num_hidden_layers=1)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
    return (*capture(model, ids), ids)


def _apply_llama(llama, make_region, apply, *args):
    qg, _, ids = llama
    after = qg.copy()
    report = apply(after, make_region(after.info["structure"]), *args)
    assert_equivalent(qg, after, ids, report)
    return report


def test_llama_norm_to_qkv_and_gate_up(llama):
    gen = torch.Generator().manual_seed(5)
    for which in ("attention", "mlp"):

        def region(st, which=which):
            site = st.attentions[0] if which == "attention" else st.mlps[0]
            return region_for_norm(st, site.input_norm)

        report = _apply_llama(llama, region, apply_diagonal, log_uniform(48, gen), "smooth")
        assert [c.roles for c in report.changes][0] == ["norm γ"]


def test_llama_up_to_down_through_silu_gate(llama):
    report = _apply_llama(
        llama,
        lambda st: region_for_up_down(st, st.mlps[0]),
        apply_diagonal,
        log_uniform(128, torch.Generator()),
        "smooth",
    )
    assert "mul_" in " ".join(report.path)  # it went through silu(gate) * up
    qg, st, _ = llama
    with pytest.raises(EquivalenceError, match=r"varies along the channels; only a diagonal"):
        apply_orthogonal(
            qg.copy(), region_for_up_down(st, st.mlps[0]), random_orthogonal(128, torch.Generator()), "rotate"
        )


def test_llama_v_to_o_gqa(llama):
    gen = torch.Generator().manual_seed(6)
    s_kv = log_uniform(16, gen)  # per source channel: 2 KV heads × head_dim 8
    _apply_llama(llama, lambda st: region_for_v_o(st, st.attentions[0]), apply_diagonal, s_kv, "smooth")
    tied = s_kv.reshape(2, 1, 8).expand(2, 3, 8).reshape(-1)  # per o column, tied over each group of 3
    _apply_llama(llama, lambda st: region_for_v_o(st, st.attentions[0]), apply_diagonal, tied, "smooth")
    h = random_orthogonal(8, gen)  # R2: one head_dim map for every head
    _apply_llama(llama, lambda st: region_for_v_o(st, st.attentions[0]), apply_orthogonal, h, "rotate")
    per_kv = torch.stack([random_orthogonal(8, gen) for _ in range(2)])
    _apply_llama(llama, lambda st: region_for_v_o(st, st.attentions[0]), apply_orthogonal, per_kv, "rotate")
    per_query_head = per_kv.repeat_interleave(3, dim=0)  # [6, 8, 8], tied over each group of 3
    _apply_llama(
        llama, lambda st: region_for_v_o(st, st.attentions[0]), apply_orthogonal, per_query_head, "rotate"
    )


def test_llama_v_to_o_refusals(llama):
    qg, st, _ = llama
    region = region_for_v_o(st, st.attentions[0])
    untied = log_uniform(48, torch.Generator().manual_seed(7))
    with pytest.raises(
        EquivalenceError, match=r"`linear_\d+`.*query heads \[0, 1, 2\] share KV head 0"
    ) as exc:
        apply_diagonal(qg.copy(), region, untied, "smooth")
    assert exc.value.node == st.attentions[0].o
    per_query_head = torch.stack([random_orthogonal(8, torch.Generator().manual_seed(i)) for i in range(6)])
    with pytest.raises(EquivalenceError, match="share KV head"):
        apply_orthogonal(qg.copy(), region, per_query_head, "rotate")
    with pytest.raises(EquivalenceError, match=r"scaled_dot_product_attention.*only a map inside each head"):
        apply_orthogonal(qg.copy(), region, random_orthogonal(16, torch.Generator()), "rotate")


def test_llama_final_norm_to_tied_lm_head_unties(llama):
    qg, _, ids = llama
    after = qg.copy()
    st = after.info["structure"]
    report = apply_diagonal(
        after, region_for_norm(st, st.residual.final_norm), log_uniform(48, torch.Generator()), "smooth"
    )
    assert_equivalent(qg, after, ids, report)
    emb = st.embeddings[0]
    assert len(report.untied) == 1 and report.untied[0].startswith(f"{emb.weight} -> ")
    # The embedding still reads the original table, unchanged; lm_head reads its own scaled copy.
    assert torch.equal(after.get_constant(emb.weight), qg.get_constant(emb.weight))
    assert st.linears[st.lm_head].weight != emb.weight and not st.tied_embedding


def _weightless_llama(llama):
    """The tiny Llama with every γ set to 1 — a different model, but a valid baseline for R1."""
    qg, st, ids = llama
    base = qg.copy()
    for norm in st.norms.values():
        base.set_constant(norm.weight, torch.ones_like(base.get_constant(norm.weight)))
    return base, ids


def test_llama_residual_rotation_keeps_tied_embedding(llama):
    base, ids = _weightless_llama(llama)
    after = base.copy()
    st = after.info["structure"]
    report = apply_orthogonal(after, residual_region(st), random_orthogonal(48, torch.Generator()), "rotate")
    assert_equivalent(base, after, ids, report)
    assert report.untied == [] and st.tied_embedding  # E Q and W_lm Q are the same update
    readers = {c.reader for c in report.changes}
    assert st.embeddings[0].node in readers and st.lm_head in readers


def test_llama_orthogonal_through_weighted_norm_refused(llama):
    qg, st, _ = llama
    first = st.residual.readers[0]
    with pytest.raises(EquivalenceError, match=rf"`{first}` \(rms_norm\).*has γ.*run fuse_norms first"):
        apply_orthogonal(qg.copy(), residual_region(st), random_orthogonal(48, torch.Generator()), "rotate")


def test_llama_scaled_rotation_refused_through_norm_and_silu(llama):
    base, _ = _weightless_llama(llama)
    st = base.info["structure"]
    gen = torch.Generator()
    with pytest.raises(EquivalenceError, match=r"rms_norm.*divides each row"):
        apply_scaled_orthogonal(
            base.copy(), residual_region(st), log_uniform(48, gen), random_orthogonal(48, gen), "rotate"
        )


# ---- tiny BERT (post-LN, GELU) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(8))
    return (*capture(tiny_bert(num_hidden_layers=1), ids), ids)


def test_bert_post_ln_residual_user_refused(bert):
    qg, st, _ = bert
    norm = st.norms[st.attentions[0].input_norm]
    add = next(c for c in norm.consumers if c not in st.linears)
    with pytest.raises(
        EquivalenceError, match=rf"smooth: cannot absorb diag\(1/s\) past node `{add}` \(aten.add.Tensor\)"
    ):
        apply_diagonal(qg.copy(), region_for_norm(st, norm.output), torch.full((48,), 2.0), "smooth")


def test_bert_regions(bert):
    qg, st, ids = bert
    with pytest.raises(EquivalenceError, match=r"`gelu`"):
        apply_diagonal(qg.copy(), region_for_up_down(st, st.mlps[0]), torch.full((96,), 2.0), "smooth")
    with pytest.raises(EquivalenceError, match=r"LayerNorm .*fuse_norms"):
        apply_orthogonal(qg.copy(), residual_region(st), random_orthogonal(48, torch.Generator()), "rotate")
    after = qg.copy()  # MHA v→o with biases: diag(1/s)·H per head
    gen = torch.Generator().manual_seed(9)
    report = apply_scaled_orthogonal(
        after,
        region_for_v_o(after.info["structure"], st.attentions[0]),
        log_uniform(48, gen, 0.25, 4.0),
        random_orthogonal(12, gen),
        "rotate",
    )
    assert_equivalent(qg, after, ids, report)
