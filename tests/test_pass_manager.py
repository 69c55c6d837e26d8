"""PassManager: order, requires, error naming, instrument hooks, env instruments, input untouched."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.pipeline import facts
from qcompile.pipeline.contract import PASS_REGISTRY, Pass, PassContext, PassError, PassResult
from qcompile.pipeline.instruments import (
    DisablePasses,
    DumpIR,
    EquivalenceCheck,
    Instrument,
    StopAfter,
    Timing,
    VerifyIR,
)
from qcompile.pipeline.manager import PassManager, PipelineResult, run_recipe

LINEAR = torch.ops.aten.linear.default


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def captured() -> qcompile.QGraph:
    return qcompile.capture(MLP(), (torch.randn(2, 4),))


@pytest.fixture
def qgraph(captured: qcompile.QGraph) -> qcompile.QGraph:
    return captured.copy()


def linears(qgraph: qcompile.QGraph) -> list:
    return [n for n in qgraph.graph.nodes if n.target is LINEAR]


class RescaleHidden(Pass):
    """fc1 rows x2, fc2 columns /2: exact in float (powers of two), and relu(2x) = 2 relu(x)."""

    name = "rescale_hidden"
    kind = "equivalence"
    tolerance = 1e-6

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        first, second = linears(qgraph)[:2]
        w1, b1, w2 = first.args[1], first.args[2], second.args[1]
        qgraph.set_constant(w1, qgraph.get_constant(w1) * 2)
        qgraph.set_constant(b1, qgraph.get_constant(b1) * 2)
        qgraph.set_constant(w2, qgraph.get_constant(w2) / 2)
        return PassResult(qgraph, changed=True, report={"scaled": [str(w1.target), str(w2.target)]})


class NeedsStructure(Pass):
    name = "needs_structure"
    requires = (facts.STRUCTURE,)

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        return PassResult(qgraph, changed=False)


class Explodes(Pass):
    name = "explodes"

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        raise ValueError("boom")


class ReturnsNothing(Pass):
    name = "returns_nothing"

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext):  # type: ignore[override]
        return None


def noop() -> Pass:
    from qcompile.pipeline.contract import get_pass_class

    return get_pass_class("noop")()


def test_runs_passes_in_order_and_records_results(qgraph: qcompile.QGraph) -> None:
    ctx = PassContext()
    result = PassManager([noop(), RescaleHidden()], use_env=False).run(qgraph, ctx)
    assert isinstance(result, PipelineResult)
    assert [name for name, _ in result.results] == ["noop", "rescale_hidden"]
    assert result.changed and not result.results[0][1].changed
    assert result.result("rescale_hidden").report["scaled"] == ["fc1.weight", "fc2.weight"]
    assert result.total_seconds > 0 and not result.stopped_early
    assert "rescale_hidden" in result.summary()
    x = torch.randn(5, 4)
    torch.testing.assert_close(result.qgraph(x), qgraph(x), rtol=0, atol=0)


def test_input_qgraph_is_not_mutated(qgraph: qcompile.QGraph) -> None:
    before_text = qgraph.print_readable()
    before_w = qgraph.get_constant("fc1.weight").clone()
    result = PassManager([RescaleHidden()], use_env=False).run(qgraph)
    assert result.qgraph is not qgraph
    assert qgraph.print_readable() == before_text
    assert torch.equal(qgraph.get_constant("fc1.weight"), before_w)
    assert torch.equal(result.qgraph.get_constant("fc1.weight"), before_w * 2)


def analyze() -> Pass:
    from qcompile.pipeline.contract import get_pass_class

    return get_pass_class("analyze")()


def test_requires_is_a_fact_checked_on_the_graph_before_the_pass(qgraph: qcompile.QGraph) -> None:
    with pytest.raises(
        PassError,
        match="needs_structure: requires a structural analysis .*, but the graph has no "
        "structural analysis; run analyze before it",
    ):
        PassManager([NeedsStructure()], use_env=False).run(qgraph)
    result = PassManager([analyze(), NeedsStructure()], use_env=False).run(qgraph)
    assert [n for n, _ in result.results] == ["analyze", "needs_structure"]
    # the fact is read off the graph: an analysed graph satisfies it in a new pipeline too …
    again = PassManager([NeedsStructure()], use_env=False).run(result.qgraph)
    assert [n for n, _ in again.results] == ["needs_structure"]
    # … and a graph whose analysis went stale does not, whatever ran before
    stale = result.qgraph.copy()
    first = next(n for n in stale.graph.nodes if n.target is LINEAR)
    first.name = "renamed_linear"
    with pytest.raises(
        PassError, match=r"the structural analysis names 1 node\(s\) the graph no longer has, e.g. `linear`"
    ):
        PassManager([NeedsStructure()], use_env=False).run(stale)


class PromisesStructure(Pass):
    name = "promises_structure"
    ensures = (facts.STRUCTURE,)

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        return PassResult(qgraph, changed=False)


def test_a_pass_that_breaks_its_promise_fails(qgraph: qcompile.QGraph) -> None:
    with pytest.raises(
        PassError, match="promises_structure: promised a structural analysis .* but after it ran"
    ):
        PassManager([PromisesStructure()], use_env=False).run(qgraph)


def test_disabled_passes_do_not_run(qgraph: qcompile.QGraph) -> None:
    from qcompile.pipeline.instruments import DisablePasses

    result = PassManager([noop(), RescaleHidden()], [DisablePasses(["rescale_hidden"])], use_env=False).run(
        qgraph
    )
    assert [n for n, _ in result.results] == ["noop"] and result.disabled == ["rescale_hidden"]
    assert "disabled: rescale_hidden" in result.summary()
    assert torch.equal(result.qgraph.get_constant("fc1.weight"), qgraph.get_constant("fc1.weight"))
    with pytest.warns(UserWarning, match="no pass named nope"):
        PassManager([noop()], [DisablePasses(["nope"])], use_env=False).run(qgraph)


def test_pass_exception_becomes_pass_error_naming_the_pass(qgraph: qcompile.QGraph) -> None:
    with pytest.raises(PassError, match="explodes: failed: ValueError: boom") as info:
        PassManager([noop(), Explodes()], use_env=False).run(qgraph)
    assert info.value.pass_name == "explodes"
    assert isinstance(info.value.__cause__, ValueError)


def test_pass_must_return_a_pass_result(qgraph: qcompile.QGraph) -> None:
    with pytest.raises(PassError, match="returns_nothing: run\\(\\) must return a PassResult"):
        PassManager([ReturnsNothing()], use_env=False).run(qgraph)


class Recorder(Instrument):
    def __init__(self, tag: str, log: list[str]) -> None:
        self.tag, self.log = tag, log

    def before_pipeline(self, qgraph, ctx):
        self.log.append(f"{self.tag}.before_pipeline")

    def before_pass(self, pass_, qgraph, ctx):
        self.log.append(f"{self.tag}.before:{pass_.name}")

    def after_pass(self, pass_, result, ctx):
        self.log.append(f"{self.tag}.after:{pass_.name}")

    def after_pipeline(self, result, ctx):
        self.log.append(f"{self.tag}.after_pipeline")

    def on_error(self, pass_, error, qgraph, ctx):
        self.log.append(f"{self.tag}.error:{pass_.name}")


def test_instrument_hooks_nest(qgraph: qcompile.QGraph) -> None:
    log: list[str] = []
    PassManager([noop()], [Recorder("a", log), Recorder("b", log)], use_env=False).run(qgraph)
    assert log == [
        "a.before_pipeline",
        "b.before_pipeline",
        "a.before:noop",
        "b.before:noop",
        "b.after:noop",
        "a.after:noop",
        "a.after_pipeline",
        "b.after_pipeline",
    ]


def test_on_error_hook_sees_the_failing_pass(qgraph: qcompile.QGraph) -> None:
    log: list[str] = []
    with pytest.raises(PassError):
        PassManager([noop(), Explodes(), noop()], [Recorder("a", log)], use_env=False).run(qgraph)
    assert log[-1] == "a.error:explodes" and "a.after_pipeline" not in log


def test_before_copy_is_private_to_instruments_that_ask(qgraph: qcompile.QGraph) -> None:
    seen: dict[str, qcompile.QGraph] = {}

    class KeepsBefore(Instrument):
        needs_before_copy = True

        def before_pass(self, pass_, qgraph, ctx):
            seen["before"] = qgraph

    PassManager([RescaleHidden()], [KeepsBefore()], use_env=False).run(qgraph)
    torch.testing.assert_close(seen["before"].get_constant("fc1.weight"), qgraph.get_constant("fc1.weight"))


def test_env_instruments_are_added(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("QCOMPILE_TIMING", "1")
    monkeypatch.setenv("QCOMPILE_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("QCOMPILE_STOP_AFTER", "noop")
    monkeypatch.setenv("QCOMPILE_CHECK_EQUIVALENCE", "1")
    monkeypatch.setenv("QCOMPILE_VERIFY_IR", "1")
    monkeypatch.setenv("QCOMPILE_DISABLE_PASSES", "a, b")
    kinds = [type(i) for i in PassManager([noop()]).instruments]
    assert kinds == [DisablePasses, DumpIR, VerifyIR, EquivalenceCheck, StopAfter, Timing]
    disable = PassManager([noop()]).instruments[0]
    assert disable.names == ["a", "b"]
    mine = Timing()
    pm = PassManager([noop()], [mine])
    assert [i for i in pm.instruments if isinstance(i, Timing)] == [mine]  # explicit wins, no duplicate
    assert PassManager([noop()], use_env=False).instruments == []


def test_run_recipe_from_a_dict(qgraph: qcompile.QGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PASS_REGISTRY, RescaleHidden.name, RescaleHidden)
    recipe = {"recipe": {"name": "t"}, "passes": ["noop", {"name": "rescale_hidden"}]}
    timing = Timing()
    result = run_recipe(qgraph, recipe, instruments=[timing])
    assert [n for n, _ in result.results] == ["noop", "rescale_hidden"]
    assert [p.name for p in timing.passes] == ["noop", "rescale_hidden"]
    pm = PassManager.from_recipe(recipe, use_env=False)
    assert [p.name for p in pm.passes] == ["noop", "rescale_hidden"]
