"""Structural analysis: roles, norms, residual stream, attention and MLP found from the graph alone."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.analysis.analyzer import analyze
from qcompile.analysis.summary import format_structure
from qcompile.ir import keys
from qcompile.tools.models import tiny_bert, tiny_llama
from tests.zeta_model import Zeta

LLAMA_ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def _roles_by_layer(st):
    by_layer: dict = {}
    for site in st.linears.values():
        by_layer.setdefault(site.layer, []).append(site.role)
    return by_layer


def test_tiny_llama_roles_and_blocks():
    model = tiny_llama()
    cfg = model.config
    qg = qcompile.capture(model, (torch.randint(0, cfg.vocab_size, (1, 8)),))
    st = analyze(qg)
    assert st.num_layers == cfg.num_hidden_layers
    by_layer = _roles_by_layer(st)
    for layer in range(cfg.num_hidden_layers):
        assert sorted(by_layer[layer]) == sorted(LLAMA_ROLES)
    assert by_layer[None] == ["lm_head"]
    assert st.tied_embedding
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for att in st.attentions:
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            head_dim,
        )
        assert att.rope
        assert att.input_norm is not None
        assert sorted(st.norms[att.input_norm].consumers) == sorted([att.q, att.k, att.v])
    assert all(m.kind == "gated" and m.activation == "silu" for m in st.mlps)
    assert [n.kind for n in st.norms.values()] == ["rms_norm"] * (2 * cfg.num_hidden_layers + 1)
    assert all(n.weight is not None for n in st.norms.values())
    res = st.residual
    assert res is not None and not res.post_norm
    assert [st.linears[w].role for w in res.writers] == ["o", "down"] * cfg.num_hidden_layers
    assert len(res.readers) == 2 * cfg.num_hidden_layers + 1
    assert res.final_norm == st.norm_feeding(st.lm_head).output
    assert res.sources == [st.embeddings[0].node]


def test_roles_written_to_node_meta():
    qg = qcompile.capture(tiny_llama(), (torch.randint(0, 100, (1, 6)),))
    st = analyze(qg)
    for node in qg.graph.nodes:
        if node.name in st.linears:
            ann = keys.get(node)
            assert ann[keys.ROLE] == st.linears[node.name].role
            assert ann[keys.LINEAR] is st.linears[node.name]
    assert qg.info["structure"] is st


def test_renamed_architecture_gets_the_same_roles():
    """A Llama-like model written from scratch with meaningless names (q is `alpha`, up is `r`, …)."""
    model = Zeta().eval()
    qg = qcompile.capture(model, (torch.randint(0, 96, (1, 8)),))
    st = analyze(qg)
    expected = {"alpha": "q", "beta": "k", "gamma": "v", "delta": "o", "p": "gate", "r": "up", "s": "down"}
    assert st.num_layers == 2
    for site in st.linears.values():
        if site.role == "lm_head":
            assert site.module == "head"
            continue
        leaf = site.module.rsplit(".", 1)[-1]
        assert site.role == expected[leaf], (site.module, site.role)
        assert site.layer == int(site.module.split(".")[1])
    assert st.tied_embedding and st.attentions[0].rope
    assert st.attentions[0].num_kv_heads == 2 and st.attentions[0].num_heads == 6
    assert len(st.norms) == 5 and st.residual is not None and len(st.residual.writers) == 4


def test_tiny_bert_post_norm_structure():
    model = tiny_bert()
    qg = qcompile.capture(model, (torch.randint(0, 200, (2, 8)),))
    st = analyze(qg)
    layers = model.config.num_hidden_layers
    by_layer = _roles_by_layer(st)
    for layer in range(layers):
        assert sorted(by_layer[layer]) == sorted(["q", "k", "v", "o", "fc1", "fc2"])
    assert by_layer.get(None) == ["linear"]  # the pooler
    assert all(n.kind == "layer_norm" and n.bias is not None for n in st.norms.values())
    assert all(m.kind == "plain" and m.activation == "gelu" for m in st.mlps)
    assert st.residual is not None and st.residual.post_norm
    assert [st.linears[w].role for w in st.residual.writers] == ["o", "fc2"] * layers
    assert not any(a.rope for a in st.attentions)


def test_plain_mlp_has_no_transformer_structure():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    qg = qcompile.capture(model, (torch.randn(3, 8),))
    st = analyze(qg)
    assert sorted(s.role for s in st.linears.values()) == ["fc1", "fc2"]
    assert st.attentions == [] and st.residual is None and st.num_layers == 0


def test_summary_names_the_blocks():
    qg = qcompile.capture(tiny_llama(), (torch.randint(0, 100, (1, 6)),))
    text = format_structure(analyze(qg), qg)
    assert "GQA" in text and "pre-norm" in text and "tied" in text


@pytest.mark.real
def test_smollm2_structure(smollm2_qgraph):
    qg, _ = smollm2_qgraph
    st = analyze(qg)
    assert st.num_layers == 30
    by_layer = _roles_by_layer(st)
    assert all(sorted(by_layer[i]) == sorted(LLAMA_ROLES) for i in range(30))
    att = st.attentions[0]
    assert (att.num_heads, att.num_kv_heads, att.head_dim) == (9, 3, 64)
    assert st.tied_embedding and st.lm_head is not None
    assert len(st.residual.writers) == 60 and len(st.residual.readers) == 61
    mlp = st.linears[st.mlps[0].down]
    assert (mlp.in_features, mlp.out_features) == (1536, 576)


def test_roles_survive_rotation_with_online_hadamard():
    """After R4 a qcompile::hadamard op sits before every down_proj; analysis looks through it."""
    model = tiny_llama()
    batches = [(torch.randint(0, 256, (1, 16)),)]
    recipe = {"recipe": {"name": "t"}, "passes": ["analyze", "fuse_norms", "rotate"]}
    qm = qcompile.quantize(model, recipe, calibration=batches, progress=False)
    st = analyze(qm.qgraph)
    by_layer = _roles_by_layer(st)
    for layer in range(model.config.num_hidden_layers):
        assert sorted(by_layer[layer]) == sorted(LLAMA_ROLES)
    assert all(m.kind == "gated" for m in st.mlps) and len(st.mlps) == model.config.num_hidden_layers


def test_decode_step_attention_is_found_through_the_kv_cache_concat():
    from qcompile.frontend.decoder import capture_decoder

    model = tiny_llama()
    st = analyze(capture_decoder(model))
    assert st.num_layers == model.config.num_hidden_layers
    assert sorted(_roles_by_layer(st)[0]) == sorted(LLAMA_ROLES)


def test_decoder_step_final_norm_reaches_lm_head_through_the_last_token_slice():
    """The decode step computes logits for the last position only (``hidden[:, -1:]`` before lm_head):
    a row slice keeps every channel, so the final norm's consumer is still lm_head (fuse_norms and
    R1 depend on it)."""
    from qcompile.analysis.analyzer import analyze
    from qcompile.frontend.decoder import capture_decoder
    from qcompile.tools.models import tiny_llama

    qg = capture_decoder(tiny_llama())
    st = analyze(qg)
    lm_head = [name for name, site in st.linears.items() if site.role == "lm_head"]
    assert len(lm_head) == 1
    final = [n for n in st.norms.values() if lm_head[0] in n.consumers]
    assert len(final) == 1 and final[0].layer is None
