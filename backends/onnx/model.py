"""``OnnxModel``: the IR the ONNX passes read and write after ``onnx.export`` — an in-memory
``onnx.ModelProto`` plus what the later passes need to know about it (the decode step's cache
layout, the int8 cache's scales, the accuracy level, which kernel each quantized linear became).

It offers what the pass manager's instruments use on any IR: :meth:`copy`, :meth:`print_readable`
(names, shapes, dtypes and attributes — never weight values), :meth:`constants_text` (one line per
initializer with a content hash, so a dump diff shows which weights a rewrite touched),
:meth:`verify` (``onnx.checker``) and :meth:`run_flat` (ONNX Runtime on the QGraph's flat inputs,
for the equivalence check). Nothing is written to disk until :meth:`save`.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.utils._pytree as pytree
from onnx import numpy_helper

from qcompile.backends.onnx.accuracy import ACCURACY_LEVEL_CONFIG, with_accuracy_level
from qcompile.backends.onnx.linears import LinearExport
from qcompile.frontend.decoder import CacheLayout

PAST_LENGTH_INPUT = "past_sequence_length"
PAST_PREFIX = "past_key_values."
_TWO_GB = 2**31


@dataclass
class OnnxModel:
    """An ONNX model in memory and the facts the ONNX passes share (module docstring)."""

    proto: onnx.ModelProto
    opset: int
    accuracy_level: int
    layout: CacheLayout | None = None  # a decode step's cache (dtype: the file's cache type)
    cache_scales: list[np.ndarray] | None = None  # int8 cache: per cache input, its [1, KV, 1, D] scale
    linears: list[LinearExport] = field(default_factory=list)
    int4_format: str = "matmulnbits"  # or "qdq" after the onnx.qdq_format pass

    # ---- what the graph looks like -----------------------------------------------------------------

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.graph.input]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.graph.output]

    @property
    def is_decode_step(self) -> bool:
        return self.layout is not None and any(n.startswith(PAST_PREFIX) for n in self.input_names)

    def op_counts(self) -> dict[str, int]:
        return dict(collections.Counter(node.op_type for node in self.graph.node))

    def copy(self) -> OnnxModel:
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        return replace(self, proto=proto, linears=list(self.linears))

    # ---- text --------------------------------------------------------------------------------------

    def print_readable(self) -> str:
        """One line per input, output and node: names, dtypes, shapes, attributes (no weights)."""
        known = _value_types(self.graph)
        inits = {i.name for i in self.graph.initializer}
        lines = [
            f"onnx model: opset {self.opset}, accuracy_level {self.accuracy_level}, "
            f"{len(self.graph.node)} nodes, {len(inits)} initializers, int4 as {self.int4_format}"
        ]
        lines += [f"input  {v.name}: {_type_text(v.type)}" for v in self.graph.input]
        lines += [f"output {v.name}: {_type_text(v.type)}" for v in self.graph.output]
        for node in self.graph.node:
            ins = ", ".join(("@" if n in inits else "%") + n if n else "_" for n in node.input)
            outs = ", ".join(f"%{o}" for o in node.output) or "_"
            op = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            attrs = ", ".join(f"{a.name}={_attr_text(a)}" for a in node.attribute)
            types = "; ".join(known[o] for o in node.output if o in known)
            line = f"{outs} = {op}" + (f"<{attrs}>" if attrs else "") + f"({ins})"
            lines.append(line + (f"  # {types}" if types else ""))
        return "\n".join(lines) + "\n"

    def constants_text(self) -> str:
        """One line per initializer: name, dtype[shape], a short content hash."""
        lines = []
        for t in self.graph.initializer:
            data = t.raw_data or numpy_helper.to_array(t).tobytes()
            dtype = onnx.helper.tensor_dtype_to_string(t.data_type).removeprefix("TensorProto.").lower()
            shape = "x".join(str(d) for d in t.dims)
            lines.append(f"{t.name}  {dtype}[{shape}]  sha1={hashlib.sha1(data).hexdigest()[:10]}")
        return "\n".join(lines) + "\n"

    # ---- checks and running --------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """``onnx.checker``'s complaint (empty: well formed), plus graph inputs/outputs named once."""
        problems = []
        try:
            onnx.checker.check_model(self.proto)
        except (onnx.checker.ValidationError, ValueError) as exc:
            problems.append(f"onnx.checker: {str(exc).strip().splitlines()[0]}")
        for what, names in (("input", self.input_names), ("output", self.output_names)):
            twice = [n for n, k in collections.Counter(names).items() if k > 1]
            if twice:
                problems.append(f"graph {what}(s) declared more than once: {', '.join(twice)}")
        return problems

    def flatten_inputs(self, args: tuple) -> list[Any]:
        """Positional inputs (nested tuples, e.g. a KV cache) as the flat list :meth:`run_flat` takes."""
        return pytree.tree_leaves(tuple(args))

    def session(self, *, exact: bool = True, threads: int = 0) -> Any:
        """An ONNX Runtime session (CPU EP) on this model; ``exact`` runs every weight-only
        MatMulNBits at accuracy level 1 (fp32 activations: the reference's semantics)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        proto = self.proto
        if exact:
            proto = with_accuracy_level(proto, 1)
            so.add_session_config_entry(ACCURACY_LEVEL_CONFIG, "1")
        return ort.InferenceSession(
            proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]
        )

    def feeds(self, flat_inputs: list[Any]) -> dict[str, np.ndarray]:
        """Input name -> array: the QGraph's flat inputs cast to the declared types, and
        ``past_sequence_length`` (a shared-buffer decode step) read off the cache shapes."""
        declared = {v.name: v.type.tensor_type.elem_type for v in self.graph.input}
        names = [name for name in declared if name != PAST_LENGTH_INPUT]
        if len(names) != len(flat_inputs):
            raise ValueError(f"OnnxModel: {len(flat_inputs)} inputs given, the model takes {names}")
        feeds = {}
        for name, value in zip(names, flat_inputs, strict=True):
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            feeds[name] = array.astype(onnx.helper.tensor_dtype_to_np_dtype(declared[name]), copy=False)
        if PAST_LENGTH_INPUT in declared:
            past = next(v for k, v in feeds.items() if k.startswith(PAST_PREFIX))
            feeds[PAST_LENGTH_INPUT] = np.array([past.shape[2]], dtype=np.int64)
        return feeds

    def run_flat(self, flat_inputs: list[Any]) -> list[torch.Tensor]:
        """Run in ONNX Runtime on flat inputs (see :meth:`feeds`); outputs as torch tensors."""
        session = self.session()
        return [torch.from_numpy(o) for o in session.run(None, self.feeds(list(flat_inputs)))]

    # ---- the artifact --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> int:
        """Write the model to ``path`` (weights inline; beside it in ``<name>.data`` past ONNX's 2 GB
        protobuf limit). Returns the bytes written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        large = self.proto.ByteSize() >= _TWO_GB
        onnx.save_model(self.proto, str(path), save_as_external_data=large, location=f"{path.name}.data")
        size = path.stat().st_size
        return size + (path.with_name(f"{path.name}.data").stat().st_size if large else 0)

    def __repr__(self) -> str:
        kind = "decode step" if self.is_decode_step else "model"
        return f"OnnxModel({kind}, {len(self.graph.node)} nodes, opset {self.opset})"


def _type_text(t: onnx.TypeProto) -> str:
    tt = t.tensor_type
    dtype = onnx.helper.tensor_dtype_to_string(tt.elem_type).removeprefix("TensorProto.").lower()
    if not tt.HasField("shape"):
        return dtype
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in tt.shape.dim]
    return f"{dtype}[{', '.join(dims)}]"


def _value_types(graph: onnx.GraphProto) -> dict[str, str]:
    return {v.name: _type_text(v.type) for v in (*graph.value_info, *graph.input, *graph.output)}


def _attr_text(a: onnx.AttributeProto) -> str:
    value = onnx.helper.get_attribute_value(a)
    if isinstance(value, onnx.TensorProto):
        dtype = onnx.helper.tensor_dtype_to_string(value.data_type).removeprefix("TensorProto.").lower()
        small = int(np.prod(value.dims)) <= 8
        shown = numpy_helper.to_array(value).tolist() if small else "…"
        return f"{dtype}[{'x'.join(map(str, value.dims))}]{shown}"
    if isinstance(value, bytes):
        return repr(value.decode(errors="replace"))
    if isinstance(value, onnx.GraphProto):
        return f"<graph {value.name}>"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, … {len(value)} values]"
    return str(value)
