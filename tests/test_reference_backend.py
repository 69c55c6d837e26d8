"""``qcompile.backends.reference``: runs a QGraph in torch, matches eager, moves without touching the original."""

from __future__ import annotations

import pytest
import torch

from qcompile import capture
from qcompile.backends.reference import ReferenceRunner, run
from qcompile.tools.models import tiny_llama
from tests.test_capture import TinyMLP, seeded, token_ids


@pytest.fixture(scope="module")
def llama_and_graph():
    model = tiny_llama()
    return model, capture(model, (token_ids(2, 8),))


def graph_devices(qgraph) -> set[torch.device]:
    """Every device a graph mentions: its constants' and those baked into call arguments."""
    found = {t.device for t in qgraph.graph_module.buffers()}
    for node in qgraph.graph.nodes:
        torch.fx.node.map_aggregate(
            (node.args, node.kwargs), lambda a: found.add(a) if isinstance(a, torch.device) else None
        )
    return found


def test_run_matches_eager_with_the_output_structure(llama_and_graph) -> None:
    model, qgraph = llama_and_graph
    ids = token_ids(3, 5, seed=1)
    out = run(qgraph, ids)
    assert type(out) is type(model(ids))  # CausalLMOutputWithPast, as the module returns
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(ids).logits, rtol=0, atol=1e-5)


def test_runner_on_the_graphs_own_device_shares_the_graph() -> None:
    model = seeded(TinyMLP())
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    qgraph = capture(model, (x,))
    runner = ReferenceRunner(qgraph)
    assert runner.qgraph is qgraph and runner.device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=0, atol=1e-6)


def test_moving_rewrites_a_copy_and_leaves_the_original(llama_and_graph) -> None:
    _, qgraph = llama_and_graph
    assert graph_devices(qgraph) == {torch.device("cpu")}  # arange(device=cpu), to(cpu), constants
    runner = ReferenceRunner(qgraph, "meta")  # no kernels run: this checks the move itself
    assert runner.qgraph is not qgraph
    assert graph_devices(runner.qgraph) == {torch.device("meta")}
    assert graph_devices(qgraph) == {torch.device("cpu")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(llama_and_graph) -> None:
    model, qgraph = llama_and_graph
    ids = token_ids(2, 6, seed=2)
    out = run(qgraph, ids, device="cuda")
    assert out.logits.device.type == "cuda"
    with torch.no_grad():
        torch.testing.assert_close(out.logits.cpu(), model(ids).logits, rtol=1e-4, atol=1e-4)


def test_rejects_a_non_qgraph() -> None:
    with pytest.raises(TypeError, match="expected a QGraph"):
        ReferenceRunner(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
