"""The IR verifier and the VerifyIR instrument: a pass that leaves a malformed QGraph is named."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.ir.verify import verify
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, get_pass_class
from qcompile.pipeline.instruments import VerifyIR
from qcompile.pipeline.manager import PassManager
from tests.test_pass_manager import MLP

LINEAR = torch.ops.aten.linear.default


@pytest.fixture
def analysed() -> qcompile.QGraph:
    qg = qcompile.capture(MLP(), (torch.randn(2, 4),))
    get_pass_class("analyze")()(qg, PassContext())
    return qg


def test_a_captured_and_analysed_graph_is_well_formed(analysed: qcompile.QGraph) -> None:
    assert verify(analysed) == []


class DropsMeta(Pass):
    name = "drops_meta"

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        next(n for n in qgraph.graph.nodes if n.target is LINEAR).meta.pop("val")
        return PassResult(qgraph, changed=True)


class RenamesALinear(Pass):
    name = "renames_linear"

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        next(n for n in qgraph.graph.nodes if n.target is LINEAR).name = "someone_else"
        return PassResult(qgraph, changed=True)


class WritesAnUndocumentedKey(Pass):
    name = "writes_undocumented"

    def run(self, qgraph: qcompile.QGraph, ctx: PassContext) -> PassResult:
        next(iter(qgraph.graph.nodes)).meta.setdefault("qcompile", {})["my_note"] = 1
        return PassResult(qgraph, changed=True)


@pytest.mark.parametrize(
    ("bad_pass", "message"),
    [
        (DropsMeta(), r"drops_meta: left a malformed IR: `linear` \(call_function .*\) has no meta\['val'\]"),
        (RenamesALinear(), "renames_linear: left a malformed IR: the structural analysis names 1 node"),
        (
            WritesAnUndocumentedKey(),
            r"writes_undocumented: left a malformed IR: .* undocumented annotation\(s\) \['my_note'\]",
        ),
    ],
)
def test_verify_ir_names_the_pass_that_broke_the_graph(analysed, bad_pass: Pass, message: str) -> None:
    with pytest.raises(PassError, match=message):
        PassManager([bad_pass], [VerifyIR()], use_env=False).run(analysed)
    # without the instrument the same pipeline runs through: the check is the instrument's
    PassManager([bad_pass], use_env=False).run(analysed)


def test_a_freed_constant_still_read_is_found(analysed: qcompile.QGraph) -> None:
    broken = analysed.copy()
    target = str(next(n for n in broken.graph.nodes if n.op == "get_attr").target)
    *path, leaf = target.split(".")
    owner = broken.graph_module
    for part in path:
        owner = getattr(owner, part)
    owner._buffers.pop(leaf, None)
    owner._parameters.pop(leaf, None)
    problems = verify(broken)
    assert any(f"constant `{target}`" in p and "is gone" in p for p in problems), problems
