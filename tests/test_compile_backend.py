"""Front door 2, ``torch.compile(model, backend="qcompile")``: same numbers as eager, same IR as capture.

The strongest honest statement about "same IR": the multiset of ATen op targets in the compile-path
QGraph equals the capture-path one — Dynamo's first, static graph against ``capture(dynamic=False)``,
its recompiled dynamic graph (and ``dynamic=True``) against ``capture(dynamic=True)`` — for the MLP,
the CNN and tiny Llama, and the structural analysis reports the same structure through both doors.
What differs is naming only: node and symbol names, the input's name (``l_args_0_`` vs
``input_ids``), and which of two tied weights names the shared constant (capture: ``lm_head.weight``,
Dynamo: ``model.embed_tokens.weight``). Tiny BERT is the exception, and it is transformers': its
all-true attention mask is built under export but skipped under Dynamo.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

import qcompile.frontend.compile_backend as cb
from qcompile import CaptureError, QGraph, capture
from qcompile.tools.models import tiny_bert, tiny_llama
from tests.test_capture import ModuleSnapshot, TinyCNN, TinyMLP, assert_qgraph_form, seeded, token_ids


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    cb.clear_compiled()
    yield
    torch._dynamo.reset()


def op_counts(qgraph: QGraph) -> Counter[str]:
    return Counter(str(n.target) for n in qgraph.graph.nodes if n.op == "call_function")


def last_qgraph() -> QGraph:
    entry = cb.last_compiled()
    assert entry is not None, "the backend recorded no compiled graph"
    return entry.qgraph


def test_backend_is_registered_by_entry_point() -> None:
    assert "qcompile" in torch._dynamo.list_backends()
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("qcompile") is cb.qcompile_backend


def test_mlp_matches_eager_and_leaves_the_model_alone() -> None:
    model = seeded(TinyMLP())
    snap = ModuleSnapshot(model)
    compiled = torch.compile(model, backend="qcompile")
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    snap.assert_unchanged(model)
    entry = cb.last_compiled()
    assert entry is not None and len(entry.input_indices) == 1  # x; the four weights are constants
    assert set(entry.constants) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert_qgraph_form(entry.qgraph, model, n_inputs=1)
    assert entry.qgraph.source == "torch.compile"
    assert op_counts(entry.qgraph) == op_counts(capture(model, (x,), dynamic=False))


def test_cnn_matches_eager_and_same_ops_as_capture() -> None:
    model = seeded(TinyCNN())
    compiled = torch.compile(model, backend="qcompile")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    assert_qgraph_form(last_qgraph(), model, n_inputs=1)
    assert op_counts(last_qgraph()) == op_counts(capture(model, (x,), dynamic=False))


def test_tiny_llama_static_then_dynamic_matches_eager_and_capture() -> None:
    model = tiny_llama(use_cache=True)  # the caller's config keeps use_cache=True throughout
    snap = ModuleSnapshot(model)
    compiled = torch.compile(model, backend="qcompile")
    with torch.no_grad():
        ids = token_ids(2, 8)
        out = compiled(ids, use_cache=False)  # capture's program: no KV cache among the outputs
        torch.testing.assert_close(out.logits, model(ids, use_cache=False).logits, rtol=0, atol=1e-5)
        static = last_qgraph()
        assert_qgraph_form(static, model, n_inputs=1)
        assert op_counts(static) == op_counts(capture(model, (ids,), dynamic=False))

        # A new shape: Dynamo recompiles with symbolic sizes, which arrive as SymInt inputs; the
        # backend reads them off the tensor instead (aten.sym_size.int), so the QGraph takes ids only.
        ids2 = token_ids(3, 5, seed=1)
        torch.testing.assert_close(
            compiled(ids2, use_cache=False).logits, model(ids2, use_cache=False).logits, rtol=0, atol=1e-5
        )
        assert len(cb.compiled_graphs()) == 2
        dynamic = last_qgraph()
        assert cb.last_compiled().input_indices == (2,)  # after Dynamo's two size arguments
        assert_qgraph_form(dynamic, model, n_inputs=1)
        assert op_counts(dynamic) == op_counts(capture(model, (ids,)))
        # The dynamic graph serves a third shape without recompiling.
        ids3 = token_ids(4, 3, seed=2)
        torch.testing.assert_close(
            compiled(ids3, use_cache=False).logits, model(ids3, use_cache=False).logits, rtol=0, atol=1e-5
        )
        assert len(cb.compiled_graphs()) == 2
    snap.assert_unchanged(model)
    # Display names follow the modules, as in capture.
    linears = [n for n in dynamic.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert "model.layers.0.self_attn.q_proj" in dynamic.display_name(linears[0])


def test_tiny_bert_dynamic_true_matches_eager_and_capture() -> None:
    """``dynamic=True`` also turns module floats (eps, scaling) into inputs; they are baked back in."""
    model = tiny_bert()
    snap = ModuleSnapshot(model)
    compiled = torch.compile(model, backend="qcompile", dynamic=True)
    with torch.no_grad():
        ids = token_ids(2, 8)
        torch.testing.assert_close(
            compiled(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=1e-5
        )
        qgraph = last_qgraph()
        assert_qgraph_form(qgraph, model, n_inputs=1)
        # transformers itself builds BERT's all-true attention mask under export but proves it away
        # under Dynamo (SDPA gets no mask): those few mask ops are the only difference.
        compiled_ops, captured_ops = op_counts(qgraph), op_counts(capture(model, (ids,)))
        assert compiled_ops <= captured_ops
        assert set(captured_ops - compiled_ops) <= {
            "aten.arange.default", "aten.add.Tensor", "aten.unsqueeze.default", "aten.ge.Scalar",
            "aten.expand.default",
        }  # fmt: skip
        ids2 = token_ids(3, 6, seed=3)
        torch.testing.assert_close(
            compiled(ids2).last_hidden_state, model(ids2).last_hidden_state, rtol=0, atol=1e-5
        )
    assert len(cb.compiled_graphs()) == 1
    snap.assert_unchanged(model)


def test_recipe_runs_and_the_analysis_sees_what_it_sees_through_capture() -> None:
    from qcompile.pipeline.manager import run_recipe

    model = tiny_llama()
    debug: list[cb.CompiledGraph] = []
    compiled = torch.compile(
        model, backend="qcompile", options={"recipe": "fp", "debug": debug, "inductor": False}, dynamic=True
    )
    ids = token_ids(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert len(debug) == 1 and debug[0] is cb.last_compiled()
    entry = debug[0]
    assert entry.recipe == "fp" and entry.pipeline is not None
    via_compile = entry.pipeline.result("analyze").report
    via_capture = run_recipe(capture(model, (ids,)), "fp").result("analyze").report
    assert via_compile == via_capture
    assert via_compile["layers"] == 2 and via_compile["tied_embedding"]


def test_weights_are_frozen_copies_taken_at_compile_time() -> None:
    model = seeded(TinyMLP())
    compiled = torch.compile(model, backend="qcompile")
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = compiled(x).clone()
        model.fc1.weight.add_(1.0)  # not seen: the compiled graph holds a frozen copy
        torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)


def test_modules_not_inlined_are_copied_too() -> None:
    """With ``inline_inbuilt_nn_modules=False`` Dynamo calls the caller's modules (call_module)."""
    model = seeded(TinyMLP())
    snap = ModuleSnapshot(model)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch._dynamo.config.patch(inline_inbuilt_nn_modules=False), torch.no_grad():
        compiled = torch.compile(model, backend="qcompile")
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    snap.assert_unchanged(model)
    assert_qgraph_form(last_qgraph(), model, n_inputs=1)


def test_graph_breaks_compile_each_piece() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            torch._dynamo.graph_break()
            return self.b(h)

    model = seeded(Broken())
    compiled = torch.compile(model, backend="qcompile")
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-5)
    assert len(cb.compiled_graphs()) == 2


def test_unknown_option_is_named() -> None:
    compiled = torch.compile(seeded(TinyMLP()), backend="qcompile", options={"recipie": "fp"})
    with pytest.raises(Exception, match="unknown option.*'recipie'.*known options: recipe"):
        compiled(torch.ones(1, 16))


def test_training_mode_dropout_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    compiled = torch.compile(model, backend="qcompile")
    with pytest.raises(Exception, match="dropout in training mode.*model.eval"):
        compiled(torch.ones(2, 4))


def test_buffer_writes_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()  # updates running stats
    snap = ModuleSnapshot(model)
    compiled = torch.compile(model, backend="qcompile")
    with pytest.raises(Exception, match="writes to module buffers.*running_mean.*model.eval"):
        compiled(torch.randn(3, 4))
    snap.assert_unchanged(model)


def test_capture_dynamo_graph_rejects_mismatched_inputs() -> None:
    gm = torch.fx.symbolic_trace(TinyMLP())
    with pytest.raises(CaptureError, match="placeholders"):
        cb.capture_dynamo_graph(gm, [])


def test_a_graph_dynamo_reuses_for_other_weights_runs_those_weights() -> None:
    """With inlined nn modules the parameters are graph inputs, so Dynamo runs one compiled graph for
    every module instance it was traced from; the backend's weights are frozen copies, so it must
    notice other weights arriving (it used to return the first instance's outputs)."""
    first, second = seeded(nn.Linear(4, 4), 0), seeded(nn.Linear(4, 4), 1)

    def apply(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return block(x) * 2

    compiled = torch.compile(apply, backend="qcompile")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(compiled(first, x), apply(first, x), rtol=0, atol=1e-6)
        torch.testing.assert_close(compiled(second, x), apply(second, x), rtol=0, atol=1e-6)
        torch.testing.assert_close(compiled(first, x), apply(first, x), rtol=0, atol=1e-6)
    assert len(cb.compiled_graphs()) == 2  # Dynamo's one graph, compiled once per weight set
