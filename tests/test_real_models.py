"""Both front doors on the packaged real models: SmolLM2 (Llama, GQA, tied) and MiniLM (BERT)."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompile

pytestmark = pytest.mark.real


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_smollm2_capture_matches_eager(smollm2, smollm2_qgraph):
    model, tok = smollm2
    qg, ids = smollm2_qgraph
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    out = qg(ids).logits
    assert (out - ref).abs().max().item() <= 1e-4
    # Dynamic batch and sequence: another shape runs without re-capture.
    other = tok(["A different sentence, longer than the first one was."] * 3, return_tensors="pt").input_ids
    with torch.no_grad():
        ref2 = model(other, use_cache=False).logits
    assert (qg(other).logits - ref2).abs().max().item() <= 1e-4
    assert all(n.op != "placeholder" or n.name.startswith(("input", "arg")) for n in qg.graph.nodes)


def test_smollm2_torch_compile_backend(smollm2):
    model, tok = smollm2
    torch._dynamo.reset()
    before = _state(model)
    use_cache = model.config.use_cache
    ids = tok(["The capital of France is"] * 2, return_tensors="pt").input_ids
    compiled = torch.compile(model, backend="qcompile", options={"recipe": "fp", "inductor": False})
    with torch.no_grad():
        out = compiled(ids, use_cache=False).logits
        ref = model(ids, use_cache=False).logits
    assert (out - ref).abs().max().item() <= 1e-4
    from qcompile.frontend.compile_backend import last_compiled

    record = last_compiled()
    st = record.qgraph.info["structure"]
    assert st.num_layers == 30 and st.tied_embedding
    after = _state(model)
    assert model.config.use_cache == use_cache
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def minilm():
    from qcompile.tools.models import load_minilm

    return load_minilm()


def test_minilm_capture_and_compile(minilm):
    model, tok = minilm
    ids = tok(
        ["a sentence to embed", "another, slightly longer sentence to embed"],
        padding=True,
        return_tensors="pt",
    )
    ids = ids.input_ids
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    snapshot = copy.deepcopy(_state(model))
    qg = qcompile.capture(model, (ids,))
    assert (qg(ids).last_hidden_state - ref).abs().max().item() <= 1e-4
    from qcompile.analysis.analyzer import analyze

    st = analyze(qg)
    assert st.num_layers == 6 and st.residual is not None and st.residual.post_norm
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="qcompile", options={"recipe": "fp", "inductor": False})
    with torch.no_grad():
        out = compiled(ids).last_hidden_state
    assert (out - ref).abs().max().item() <= 1e-4
    assert all(torch.equal(snapshot[k], v) for k, v in _state(model).items())
    torch._dynamo.reset()
