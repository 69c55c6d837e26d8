"""``DumpIR``: the IR before the pipeline and after every pass as numbered, diffable text files
(after MLIR's ``--mlir-print-ir-after-all``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

from qcompile.ir import QGraph
from qcompile.pipeline.contract import Pass, PassContext, PassResult
from qcompile.pipeline.instruments.base import Instrument

_DUMP_FILE = re.compile(r"^\d{2,}_[\w.+-]*\.(txt|constants\.txt|report\.json|error\.txt)$")


def format_constants(qgraph: QGraph) -> str:
    """One line per constant: target, dtype/shape, abs-max and a short content hash. The IR text does
    not show values, so this is where a diff reveals what an equivalence pass did to the weights."""
    lines, seen = [], set()
    for node in qgraph.graph.nodes:
        if node.op != "get_attr" or node.target in seen:
            continue
        seen.add(node.target)
        t = qgraph.get_constant(node).detach().to("cpu").contiguous()
        digest = hashlib.sha1(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()[:10] if t.numel() else "-"
        absmax = (
            f"{float(t.abs().max()):.6g}" if t.numel() and (t.is_floating_point() or t.is_complex()) else "-"
        )
        shape = "x".join(str(d) for d in t.shape)
        lines.append(
            f"{node.target}  {str(t.dtype).replace('torch.', '')}[{shape}]  absmax={absmax}  sha1={digest}"
        )
    return "\n".join(lines) + "\n"


def _jsonable_options(pass_: Pass) -> Any:
    options = getattr(pass_, "options", None)
    return asdict(options) if is_dataclass(options) and not isinstance(options, type) else options


class DumpIR(Instrument):
    """Write the IR before the pipeline and after every pass as numbered, diffable text files.

    ``00_input.txt``, ``01_<pass>.txt``, ``02_<pass>.txt``, ... (``qgraph.print_readable()``), and
    next to each ``NN_<pass>.report.json`` (kind, changed, summary, options, report) and, with
    ``constants=True``, ``NN_<pass>.constants.txt`` (:func:`format_constants`: weight changes do not
    show in the IR text). Files of an earlier dump in the same directory are removed first.
    ``diff 01_smooth.txt 02_rotate.txt`` shows what ``rotate`` did. A failing pass leaves
    ``NN_<pass>.error.txt`` with the error and the graph as far as it got.

    Any IR with ``print_readable()`` is dumped (an ONNX model after ``onnx.export`` too; its
    ``constants_text()`` gives the constants file). ``append=True`` continues the numbering of the
    dump already in the directory instead of replacing it — for a second pipeline over the first
    one's result, e.g. ``qcompile.lower`` after ``qcompile.quantize`` (its input is the previous
    pipeline's last IR, so it is not written again).
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, constants: bool = True, append: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.constants = constants
        self.append = append
        self.index = 0
        self.written: list[Path] = []

    def before_pipeline(self, ir: Any, ctx: PassContext) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.written = []
        last = self._last_index()
        if self.append and last is not None:
            self.index = last
            return
        for stale in self.directory.iterdir():
            if stale.is_file() and _DUMP_FILE.match(stale.name):
                stale.unlink()
        self.index = 0
        self._write_graph("00_input", ir)

    def _last_index(self) -> int | None:
        """The highest ``NN`` of the dump files in the directory (None: no dump there)."""
        found = [int(p.name.split("_", 1)[0]) for p in self.directory.iterdir() if _DUMP_FILE.match(p.name)]
        return max(found, default=None)

    def before_pass(self, pass_: Pass, ir: Any, ctx: PassContext) -> None:
        self.index += 1

    def after_pass(self, pass_: Pass, result: PassResult, ctx: PassContext) -> None:
        stem = f"{self.index:02d}_{pass_.name}"
        self._write_graph(stem, result.ir)
        report = {
            "pass": pass_.name,
            "kind": pass_.kind,
            "changed": result.changed,
            "summary": result.summary,
            "options": _jsonable_options(pass_),
            "report": result.report,
        }
        self._write(f"{stem}.report.json", json.dumps(report, indent=2, default=str) + "\n")

    def on_error(self, pass_: Pass, error: BaseException, ir: Any, ctx: PassContext) -> None:
        text = f"# {type(error).__name__}: {error}\n\n{ir.print_readable()}"
        self._write(f"{self.index:02d}_{pass_.name}.error.txt", text)

    def _write_graph(self, stem: str, ir: Any) -> None:
        self._write(f"{stem}.txt", ir.print_readable())
        if not self.constants:
            return
        if isinstance(ir, QGraph):
            self._write(f"{stem}.constants.txt", format_constants(ir))
        elif hasattr(ir, "constants_text"):  # another IR (an ONNX model) lists its own constants
            self._write(f"{stem}.constants.txt", ir.constants_text())

    def _write(self, name: str, text: str) -> None:
        path = self.directory / name
        path.write_text(text, encoding="utf-8")
        self.written.append(path)

    def __repr__(self) -> str:
        return f"DumpIR({str(self.directory)!r}{', append=True' if self.append else ''})"
