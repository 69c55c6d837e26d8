"""Front door 1, ``qcompile.frontend.capture``: tiny models in, the QGraph form out, the caller's module untouched.

The QGraph form checked here (:func:`assert_qgraph_form`) is what every pass relies on; the
``torch.compile`` backend's tests hold its graphs to the same function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qcompile import CaptureError, QGraph, capture
from qcompile.tools.models import tiny_bert, tiny_llama

# ---- shared checks (also used by test_compile_backend) -------------------------------------------


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class TinyCNN(nn.Module):
    """conv2d + relu + max-pool + linear: a non-transformer graph with 4-d activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(x.flatten(1))


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise ``module``'s parameters from ``seed`` (leaves the global RNG alone)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def token_ids(batch: int, seq: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


class ModuleSnapshot:
    """Everything about a module that capture/compile must leave alone, for a before/after check."""

    def __init__(self, module: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
        self.requires_grad = {k: p.requires_grad for k, p in module.named_parameters()}
        self.training = {k: m.training for k, m in module.named_modules()}
        config = getattr(module, "config", None)
        self.use_cache = getattr(config, "use_cache", None)
        self.param_ids = {k: id(p) for k, p in module.named_parameters()}

    def assert_unchanged(self, module: nn.Module) -> None:
        now = module.state_dict(keep_vars=True)
        assert now.keys() == self.state.keys()
        for k, before in self.state.items():
            assert torch.equal(now[k].detach(), before), f"{k} changed"
        assert {k: p.requires_grad for k, p in module.named_parameters()} == self.requires_grad
        assert {k: m.training for k, m in module.named_modules()} == self.training
        assert getattr(getattr(module, "config", None), "use_cache", None) == self.use_cache
        assert {k: id(p) for k, p in module.named_parameters()} == self.param_ids


def assert_qgraph_form(qgraph: QGraph, model: nn.Module, n_inputs: int) -> None:
    """The QGraph contract: inputs are the only placeholders, weights are frozen private constants,
    every node has meta["val"]."""
    gm = qgraph.graph_module
    placeholders = [n for n in qgraph.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == n_inputs, [n.name for n in placeholders]
    for node in qgraph.graph.nodes:
        if node.op != "output":
            assert "val" in node.meta, f"{node.name} has no meta['val']"
    assert not list(gm.parameters()), "weights must be frozen buffers, not parameters"
    attrs = [n for n in qgraph.graph.nodes if n.op == "get_attr"]
    assert attrs, "weights must be get_attr constants"
    model_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for node in attrs:
        value = qgraph.get_constant(node)
        assert not value.requires_grad, node.target
        assert value.untyped_storage().data_ptr() not in model_ptrs, (
            f"{node.target} shares the caller's storage"
        )
        assert tuple(node.meta["val"].shape) == tuple(value.shape)
    # Constants are named after the model's own parameters and buffers, equal to them, each storage
    # stored once (a tied embedding and lm_head share one constant), and every parameter is there.
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(
        model.named_buffers(remove_duplicate=False)
    )
    targets = sorted({str(n.target) for n in attrs})
    assert [t for t in targets if t not in named] == [], "constants that are not the model's"
    for target in targets:
        assert torch.equal(qgraph.get_constant(target), named[target].detach()), target
    storages = [named[t].untyped_storage().data_ptr() for t in targets]
    assert len(set(storages)) == len(storages), "a tied weight is stored twice"
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} <= set(storages)


# ---- capture -------------------------------------------------------------------------------------


def test_capture_mlp_matches_and_runs_at_other_batch_sizes() -> None:
    model = seeded(TinyMLP())
    snap = ModuleSnapshot(model)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    qgraph = capture(model, (x,))
    assert_qgraph_form(qgraph, model, n_inputs=1)
    with torch.no_grad():
        for batch in (4, 7):
            xb = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch))
            torch.testing.assert_close(qgraph(xb), model(xb), rtol=0, atol=1e-6)
    snap.assert_unchanged(model)


def test_capture_cnn() -> None:
    model = seeded(TinyCNN())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qgraph = capture(model, (x,))
    assert_qgraph_form(qgraph, model, n_inputs=1)
    targets = {str(n.target) for n in qgraph.graph.nodes if n.op == "call_function"}
    assert {"aten.conv2d.default", "aten.relu.default", "aten.linear.default"} <= targets
    with torch.no_grad():
        x3 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(qgraph(x3), model(x3), rtol=0, atol=1e-5)


def test_capture_tiny_llama_matches_eager_at_other_shapes_and_leaves_model_alone() -> None:
    model = tiny_llama(use_cache=True)  # the caller's config must keep use_cache=True
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)  # a mixed requires_grad state
    model.train()  # capture works on an eval copy; the caller stays in training mode
    snap = ModuleSnapshot(model)

    qgraph = capture(model, (token_ids(2, 8),))

    snap.assert_unchanged(model)
    assert_qgraph_form(qgraph, model, n_inputs=1)
    model.eval()
    with torch.no_grad():
        for batch, seq in ((2, 8), (3, 5)):  # (3, 5): another batch and length than the example
            ids = token_ids(batch, seq, seed=batch)
            out = qgraph(ids)
            ref = model(ids, use_cache=False)
            assert out.logits.shape == (batch, seq, 256)
            torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


def test_capture_tiny_bert_last_hidden_state() -> None:
    model = tiny_bert()
    snap = ModuleSnapshot(model)
    qgraph = capture(model, (token_ids(2, 8),))
    snap.assert_unchanged(model)
    assert_qgraph_form(qgraph, model, n_inputs=1)
    with torch.no_grad():
        ids = token_ids(3, 6, seed=3)
        torch.testing.assert_close(
            qgraph(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=1e-5
        )


def test_capture_copies_are_independent_of_later_changes_to_the_model() -> None:
    model = seeded(TinyMLP())
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    qgraph = capture(model, (x,))
    with torch.no_grad():
        before = qgraph(x).clone()
        model.fc1.weight.add_(1.0)  # the captured graph holds its own frozen copy
        torch.testing.assert_close(qgraph(x), before, rtol=0, atol=0)
        qgraph.set_constant("fc2.weight", torch.zeros(8, 32))  # and writing it leaves the model alone
    assert model.fc2.weight.abs().sum() > 0


def test_capture_rejects_a_non_module() -> None:
    with pytest.raises(CaptureError, match="expected an nn.Module"):
        capture(lambda x: x, (torch.ones(1),))  # type: ignore[arg-type]


def test_capture_export_failure_names_the_model() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: export cannot trace it
                return x + 1
            return x - 1

    with pytest.raises(CaptureError, match="DataDependent"):
        capture(DataDependent(), (torch.ones(2),))


def test_module_snapshot_notices_changes() -> None:
    """The checker above must be able to fail."""
    model = seeded(TinyMLP())
    snap = ModuleSnapshot(model)
    with torch.no_grad():
        model.fc1.bias[0] += 1
    with pytest.raises(AssertionError, match="fc1.bias"):
        snap.assert_unchanged(model)
    snap = ModuleSnapshot(model)
    model.train()
    with pytest.raises(AssertionError):
        snap.assert_unchanged(model)
