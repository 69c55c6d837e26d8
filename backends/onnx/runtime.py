"""Run exported files with ONNX Runtime: sessions, one decode step, greedy generation.

CPU EP here; the CUDA EP is used when asked for and installed (``onnxruntime-gpu``). MatMulNBits
and MatMulInteger have kernels on both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - the onnx extra is not installed
    raise ImportError("qcompile.backends.onnx needs onnxruntime: pip install 'qcompile[onnx]'") from exc


@dataclass
class SessionOptions:
    """What a session is created with.

    Attributes:
        device: ``cpu`` or ``cuda`` (CUDA EP first, CPU EP as fallback for unsupported nodes).
        threads: intra-op threads; 0 = ORT's default (all cores).
        optimization: ORT graph optimization level: ``all`` (default), ``extended``, ``basic``, ``none``.
        optimized_model_path: where ORT writes the graph it actually runs (to check its fusions).
    """

    device: str = "cpu"
    threads: int = 0
    optimization: str = "all"
    optimized_model_path: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # session config entries


_LEVELS = {
    "none": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def providers_for(device: str) -> list[str]:
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                f"CUDA EP requested but this onnxruntime has only {available}; install onnxruntime-gpu"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return ["CPUExecutionProvider"]


def make_session(path: str | os.PathLike, options: SessionOptions | None = None) -> ort.InferenceSession:
    """An ``InferenceSession`` for ``path`` under ``options``."""
    opts = options or SessionOptions()
    so = ort.SessionOptions()
    if opts.threads:
        so.intra_op_num_threads = opts.threads
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[opts.optimization])
    if opts.optimized_model_path:
        so.optimized_model_filepath = str(opts.optimized_model_path)
    for key, value in opts.extra.items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=so, providers=providers_for(opts.device))


def run_flat(session: ort.InferenceSession, inputs: list[Any]) -> list[np.ndarray]:
    """Run with positional inputs (tensors or arrays, in the file's input order)."""
    feeds = {meta.name: _numpy(x) for meta, x in zip(session.get_inputs(), inputs, strict=True)}
    return session.run(None, feeds)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class OrtDecoder:
    """An exported decode step (:func:`qcompile.backends.onnx.export_decoder`): one call runs
    ``(input_ids, past) -> (logits, present)`` with the cache as numpy arrays."""

    def __init__(self, path: str | os.PathLike, options: SessionOptions | None = None) -> None:
        self.session = make_session(path, options)
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        past = [i for i in inputs if i.name.startswith("past_key_values.")]
        if not past or inputs[0].name != "input_ids":
            raise ValueError(f"{path}: not a decoder export (inputs: {self.names[:4]}…)")
        self.num_layers = len(past) // 2
        self.num_kv_heads, self.head_dim = int(past[0].shape[1]), int(past[0].shape[3])
        self.dtype = np.float16 if "float16" in past[0].type else np.float32

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]

    def step(self, input_ids: Any, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        outputs = run_flat(self.session, [_numpy(input_ids).astype(np.int64), *past])
        return outputs[0], outputs[1:]

    def generate(self, input_ids: Any, max_new_tokens: int, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding: prefill the prompt (empty cache), then one token per step.

        Returns ``[batch, prompt + new]`` token ids. Rows are unpadded and equally long; generation
        stops early only when every row has produced ``eos_token_id``.
        """
        ids = _numpy(input_ids).astype(np.int64)
        logits, past = self.step(ids, self.empty_cache(ids.shape[0]))
        tokens = [ids]
        done = np.zeros(ids.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            nxt = logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            tokens.append(nxt)
            if eos_token_id is not None:
                done |= nxt[:, 0] == eos_token_id
            if i + 1 == max_new_tokens or done.all():
                break
            logits, past = self.step(nxt, past)
        return np.concatenate(tokens, axis=1)
