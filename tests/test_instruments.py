"""Instruments: IR dump, timing, stop-after, equivalence check (with node localization), env."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

import pytest
import torch

import qcompile
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, get_pass_class
from qcompile.pipeline.instruments import (
    TRANSFORMED_NODES,
    DumpIR,
    EquivalenceCheck,
    StopAfter,
    Timing,
    instruments_from_env,
    relative_error,
)
from qcompile.pipeline.manager import PassManager

LINEAR = torch.ops.aten.linear.default


class MLP3(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 8)
        self.fc3 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def captured() -> qcompile.QGraph:
    return qcompile.capture(MLP3(), (torch.randn(2, 4),))


@pytest.fixture
def qgraph(captured: qcompile.QGraph) -> qcompile.QGraph:
    return captured.copy()


def ctx_with_samples() -> PassContext:
    torch.manual_seed(1)
    return PassContext(sample_inputs=[(torch.randn(3, 4),), (torch.randn(5, 4),)])


def linears(qgraph: qcompile.QGraph) -> list:
    return [n for n in qgraph.graph.nodes if n.target is LINEAR]


def scale_constant(qgraph: qcompile.QGraph, node, factor: float) -> None:
    qgraph.set_constant(node, qgraph.get_constant(node) * factor)


class RescaleHidden(Pass):
    """Rows of fc1 x2, columns of fc2 /2: exact (powers of two), and relu(2x) = 2 relu(x)."""

    name = "rescale_hidden"
    kind = "equivalence"
    tolerance = 1e-6

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        fc1, fc2 = linears(qgraph)[:2]
        scale_constant(qgraph, fc1.args[1], 2.0)
        scale_constant(qgraph, fc1.args[2], 2.0)
        scale_constant(qgraph, fc2.args[1], 0.5)
        relu = next(iter(fc1.users))
        return PassResult(qgraph, changed=True, report={TRANSFORMED_NODES: [fc1.name, relu.name]})


class BreakWeight(Pass):
    """An 'equivalence' pass with a bug: it adds ``delta`` to one linear's weight."""

    name = "break_weight"
    kind = "equivalence"
    tolerance = 1e-5

    @dataclass
    class Options:
        linear: int = -1  # which aten.linear, in graph order
        delta: float = 1.0
        also_rescale_hidden: bool = False  # a legitimate rescale (fc1 -> fc2) in the same pass
        declare_transformed: bool = True  # report the nodes the rescale changes on purpose
        tolerance: float | None = None

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        report = {}
        if self.options.also_rescale_hidden:
            report = RescaleHidden().run(qgraph, ctx).report
            if not self.options.declare_transformed:
                report = {}
        weight = linears(qgraph)[self.options.linear].args[1]
        qgraph.set_constant(weight, qgraph.get_constant(weight) + self.options.delta)
        return PassResult(qgraph, changed=True, report=report)


class InsertIdentityMul(Pass):
    """A structural change (x * 1.0 after the first relu) so the IR text differs."""

    name = "insert_mul"
    kind = "equivalence"
    tolerance = 0.0

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        relu = next(n for n in qgraph.graph.nodes if n.target is torch.ops.aten.relu.default)
        with qgraph.graph.inserting_after(relu):
            mul = qgraph.graph.call_function(torch.ops.aten.mul.Tensor, (relu, 1.0))
        relu.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
        mul.meta["val"] = relu.meta["val"]
        qgraph.recompile()
        return PassResult(qgraph, changed=True, report={"inserted": mul.name})


def noop() -> Pass:
    return get_pass_class("noop")()


# ---- DumpIR --------------------------------------------------------------------------------------


def test_dump_ir_writes_numbered_diffable_files(qgraph: qcompile.QGraph, tmp_path) -> None:
    (tmp_path / "07_stale.txt").write_text("from an older run")
    (tmp_path / "notes.md").write_text("not ours")
    pm = PassManager([noop(), InsertIdentityMul(), RescaleHidden()], [DumpIR(tmp_path)], use_env=False)
    pm.run(qgraph, ctx_with_samples())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "00_input.constants.txt",
        "00_input.txt",
        "01_noop.constants.txt",
        "01_noop.report.json",
        "01_noop.txt",
        "02_insert_mul.constants.txt",
        "02_insert_mul.report.json",
        "02_insert_mul.txt",
        "03_rescale_hidden.constants.txt",
        "03_rescale_hidden.report.json",
        "03_rescale_hidden.txt",
        "notes.md",
    ]
    assert (tmp_path / "00_input.txt").read_text() == qgraph.print_readable()
    assert (tmp_path / "01_noop.txt").read_text() == (tmp_path / "00_input.txt").read_text()

    def diff(a: str, b: str) -> list[str]:
        lines = difflib.unified_diff(
            (tmp_path / a).read_text().splitlines(), (tmp_path / b).read_text().splitlines(), lineterm=""
        )
        return [d for d in lines if d[:1] in "+-" and d[:3] not in ("+++", "---")]

    report = json.loads((tmp_path / "02_insert_mul.report.json").read_text())
    assert report["pass"] == "insert_mul" and report["changed"] is True
    mul = report["report"]["inserted"]
    added = diff("01_noop.txt", "02_insert_mul.txt")
    assert f"+%{mul} = aten.mul.Tensor(%relu, 1) : float32[s77x8]" in added
    assert f"+%linear_1 = aten.linear(%{mul}, %fc2_weight, %fc2_bias) : float32[s77x8]" in added
    # Weight-only changes show in the constants file: fc1 weight+bias and fc2 weight, nothing else.
    changed = {
        line[1:].split()[0] for line in diff("02_insert_mul.constants.txt", "03_rescale_hidden.constants.txt")
    }
    assert changed == {"fc1.weight", "fc1.bias", "fc2.weight"}


def test_dump_ir_report_shows_options_and_equivalence_numbers(qgraph: qcompile.QGraph, tmp_path) -> None:
    pm = PassManager([BreakWeight({"delta": 0.0})], [DumpIR(tmp_path), EquivalenceCheck()], use_env=False)
    pm.run(qgraph, ctx_with_samples())
    report = json.loads((tmp_path / "01_break_weight.report.json").read_text())
    assert report["options"]["delta"] == 0.0 and report["options"]["linear"] == -1
    assert report["report"]["equivalence_check"]["max_error"] == 0.0
    assert report["report"]["equivalence_check"]["passed"] is True


def test_dump_ir_writes_the_graph_of_a_failing_pass(qgraph: qcompile.QGraph, tmp_path) -> None:
    pm = PassManager([noop(), BreakWeight()], [DumpIR(tmp_path), EquivalenceCheck()], use_env=False)
    with pytest.raises(PassError):
        pm.run(qgraph, ctx_with_samples())
    error = (tmp_path / "02_break_weight.error.txt").read_text()
    assert error.startswith("# PassError: break_weight at node `linear_2`")
    assert "%linear_2 = aten.linear" in error


# ---- Timing / StopAfter --------------------------------------------------------------------------


def test_timing_records_every_pass(qgraph: qcompile.QGraph) -> None:
    timing = Timing()
    PassManager([noop(), RescaleHidden(), noop()], [timing], use_env=False).run(qgraph)
    assert [p.name for p in timing.passes] == ["noop", "rescale_hidden", "noop"]
    assert all(p.seconds > 0 for p in timing.passes)
    assert timing.total_seconds >= sum(p.seconds for p in timing.passes)
    table = timing.table()
    assert "rescale_hidden" in table and "total" in table and len(table.splitlines()) == 5


def test_stop_after_ends_the_pipeline(qgraph: qcompile.QGraph) -> None:
    ctx = PassContext()
    pm = PassManager(
        [noop(), RescaleHidden(), InsertIdentityMul()], [StopAfter("rescale_hidden")], use_env=False
    )
    result = pm.run(qgraph, ctx)
    assert result.stopped_early and result.stopped_after == "rescale_hidden"
    assert result.skipped == ["insert_mul"]
    assert [name for name, _ in result.results] == ["noop", "rescale_hidden"]
    assert "stopped after rescale_hidden" in result.summary()


def test_stop_after_unknown_pass_warns(qgraph: qcompile.QGraph) -> None:
    with pytest.warns(
        UserWarning, match="StopAfter\\('smooth'\\): no pass of that name ran; passes were: noop"
    ):
        result = PassManager([noop()], [StopAfter("smooth")], use_env=False).run(qgraph)
    assert not result.stopped_early


# ---- EquivalenceCheck ----------------------------------------------------------------------------


def test_exact_rescale_passes_and_records_its_error(qgraph: qcompile.QGraph) -> None:
    check = EquivalenceCheck()
    result = PassManager([noop(), RescaleHidden()], [check], use_env=False).run(qgraph, ctx_with_samples())
    assert [r.pass_name for r in check.records] == ["rescale_hidden"]  # analysis passes are not checked
    record = check.records[0]
    assert record.passed and record.max_error <= 1e-6 and record.tolerance == 1e-6
    assert result.result("rescale_hidden").report["equivalence_check"]["samples"] == 2
    assert "rescale_hidden" in check.table()


def test_broken_weight_names_the_pass_and_the_linear(qgraph: qcompile.QGraph) -> None:
    with pytest.raises(PassError) as info:
        PassManager([BreakWeight()], [EquivalenceCheck()], use_env=False).run(qgraph, ctx_with_samples())
    err = info.value
    assert err.pass_name == "break_weight" and err.node == "linear_2"
    assert "first diverging node `linear_2 (fc3)`" in str(err) and "> tolerance 1e-05" in str(err)


def blamed_node(qgraph: qcompile.QGraph, options: dict) -> str | None:
    with pytest.raises(PassError) as info:
        PassManager([BreakWeight(options)], [EquivalenceCheck()], use_env=False).run(
            qgraph, ctx_with_samples()
        )
    return info.value.node


def test_healed_divergence_is_not_blamed(qgraph: qcompile.QGraph) -> None:
    # linear/relu legitimately diverge (x2) and are healed at fc2; the fault is fc3 (linear_2). The
    # graph alone shows this, with or without the pass declaring what it transformed.
    for declare in (True, False):
        options = {"also_rescale_hidden": True, "declare_transformed": declare}
        assert blamed_node(qgraph, options) == "linear_2"


def test_fault_after_a_transform_on_the_same_path(qgraph: qcompile.QGraph) -> None:
    # Break fc2 (linear_1), downstream of the rescaled linear/relu: the divergence never heals.
    options = {"linear": 1, "also_rescale_hidden": True}
    assert blamed_node(qgraph, options) == "linear_1"  # the pass declared linear/relu as transformed
    # Undeclared, the first node of the unhealed path is blamed (documented limitation).
    assert blamed_node(qgraph, {**options, "declare_transformed": False}) == "linear"


def test_tolerance_option_overrides_the_class_tolerance(qgraph: qcompile.QGraph) -> None:
    check = EquivalenceCheck()
    PassManager([BreakWeight({"tolerance": 1e3})], [check], use_env=False).run(qgraph, ctx_with_samples())
    assert check.records[0].tolerance == 1e3 and check.records[0].max_error > 1e-5


def test_own_sample_inputs_and_missing_samples(qgraph: qcompile.QGraph) -> None:
    check = EquivalenceCheck(sample_inputs=[torch.randn(2, 4)])
    PassManager([RescaleHidden()], [check], use_env=False).run(qgraph, PassContext())
    assert check.records[0].passed
    with pytest.raises(PassError, match="rescale_hidden: EquivalenceCheck has no sample inputs"):
        PassManager([RescaleHidden()], [EquivalenceCheck()], use_env=False).run(qgraph, PassContext())


def test_relative_error() -> None:
    a = torch.tensor([1.0, -4.0, 2.0])
    assert relative_error(a, a.clone()) == 0.0
    assert relative_error(a, a + torch.tensor([0.0, 0.0, 0.4])) == pytest.approx(0.1)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(a, torch.tensor([1.0, float("nan"), 2.0])) == float("inf")
    assert relative_error(a, torch.ones(4)) is None  # shape changed: not comparable
    assert relative_error((a, a), (a, a * 2)) == pytest.approx(1.0)


# ---- environment -------------------------------------------------------------------------------


def test_instruments_from_env(tmp_path) -> None:
    assert instruments_from_env({}) == []
    assert instruments_from_env({"QCOMPILE_TIMING": "0", "QCOMPILE_CHECK_EQUIVALENCE": ""}) == []
    found = instruments_from_env(
        {"QCOMPILE_DUMP_DIR": str(tmp_path), "QCOMPILE_STOP_AFTER": "smooth", "QCOMPILE_TIMING": "1"}
    )
    assert list(map(type, found)) == [DumpIR, StopAfter, Timing]
    assert found[0].directory == tmp_path and found[1].pass_name == "smooth" and found[2].echo
    assert isinstance(instruments_from_env({"QCOMPILE_CHECK_EQUIVALENCE": "true"})[0], EquivalenceCheck)


def test_env_timing_prints_table(qgraph: qcompile.QGraph, monkeypatch, capsys) -> None:
    monkeypatch.setenv("QCOMPILE_TIMING", "1")
    PassManager([noop()]).run(qgraph)
    assert "noop" in capsys.readouterr().err
