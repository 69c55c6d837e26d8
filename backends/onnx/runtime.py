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

from qcompile.backends.onnx.model import PAST_LENGTH_INPUT


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


PREFILL_CHUNK = 128  # tokens per prefill call in OrtDecoder.generate (see its docstring)


class KVCache:
    """A fixed-size KV cache for a shared-buffer decode step (:mod:`.kv_buffer`): per
    layer a key and a value buffer ``[batch, kv_heads, max_len, head_dim]`` held as OrtValues, bound
    as both ``past_key_values.i.*`` and ``present.i.*`` so ``GroupQueryAttention`` appends in place.
    ``length`` is the number of valid positions; :meth:`OrtDecoder.step_inplace` advances it."""

    def __init__(self, decoder: OrtDecoder, batch: int, max_len: int) -> None:
        shape = (batch, decoder.num_kv_heads, max_len, decoder.head_dim)
        device = "cuda" if decoder.device == "cuda" else "cpu"
        self.values = [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, decoder.dtype, device, 0)
            for _ in range(2 * decoder.num_layers)
        ]
        if device == "cpu":  # zero the buffers: rows past ``length`` are never read, but keep them clean
            zeros = np.zeros(shape, dtype=decoder.dtype)
            for value in self.values:
                value.update_inplace(zeros)
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.binding: Any = None  # an IOBinding with these buffers bound (step_inplace)
        self.session: Any = None  # the session that binding belongs to

    def fill(self, past: list[np.ndarray]) -> None:
        """Copy a cache of ``past[i].shape[2]`` positions into the buffers (e.g. to time a step at a
        given context)."""
        length = past[0].shape[2]
        if length > self.max_len:
            raise ValueError(f"KVCache.fill: {length} positions do not fit a {self.max_len}-long buffer")
        full = np.zeros(self.values[0].shape(), dtype=past[0].dtype)
        for value, arr in zip(self.values, past, strict=True):
            full[:, :, :length] = arr
            value.update_inplace(full)
        self.length = length

    def numpy(self) -> list[np.ndarray]:
        """The valid part of every buffer, ``[batch, kv_heads, length, head_dim]`` (a copy)."""
        return [v.numpy()[:, :, : self.length].copy() for v in self.values]


class OrtDecoder:
    """An exported decode step (:func:`qcompile.tools.export.export_decoder`): one call runs
    ``(input_ids, past) -> (logits, present)`` with the cache as numpy arrays (:meth:`step`), or, for
    files with a shared KV buffer (input ``past_sequence_length``), in place on a :class:`KVCache`
    (:meth:`step_inplace`: no cache copies; what :meth:`generate` uses)."""

    def __init__(self, path: str | os.PathLike, options: SessionOptions | None = None) -> None:
        opts = options or SessionOptions()
        self.device = opts.device
        self.session = make_session(path, opts)
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        past = [i for i in inputs if i.name.startswith("past_key_values.")]
        if not past or inputs[0].name != "input_ids":
            raise ValueError(f"{path}: not a decoder export (inputs: {self.names[:4]}…)")
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        self.num_layers = len(past) // 2
        self.num_kv_heads, self.head_dim = int(past[0].shape[1]), int(past[0].shape[3])
        # the cache's element type: float32, float16, or int8 (an annotated int8 KV cache, per channel)
        self.dtype = {"tensor(float16)": np.float16, "tensor(int8)": np.int8}.get(past[0].type, np.float32)
        self.shared_buffer = PAST_LENGTH_INPUT in self.names

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.dtype) for _ in range(2 * self.num_layers)]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A :class:`KVCache` of ``max_len`` positions for :meth:`step_inplace`."""
        if not self.shared_buffer:
            raise ValueError(
                "OrtDecoder.new_cache: this file has no past_sequence_length input (exported with the "
                "onnx.share_kv_buffer pass disabled); use step() with numpy caches"
            )
        return KVCache(self, batch, max_len)

    def step(self, input_ids: Any, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step with the cache as arrays: ``present`` = ``past`` ++ the new positions."""
        feeds = {"input_ids": _numpy(input_ids).astype(np.int64)}
        feeds.update(zip(self.past_names, past, strict=True))
        if self.shared_buffer:
            feeds["past_sequence_length"] = np.array([past[0].shape[2]], dtype=np.int64)
        outputs = self.session.run(None, feeds)
        return outputs[0], outputs[1:]

    def step_inplace(self, input_ids: Any, cache: KVCache) -> np.ndarray:
        """One step on ``cache``: the new keys/values are written into its buffers at
        ``cache.length`` and the length advances; returns the logits."""
        ids = _numpy(input_ids).astype(np.int64)
        if ids.shape[0] != cache.batch:
            raise ValueError(f"step_inplace: batch {ids.shape[0]} but the cache holds {cache.batch} rows")
        if cache.length + ids.shape[1] > cache.max_len:
            raise ValueError(
                f"step_inplace: {cache.length} + {ids.shape[1]} positions exceed the cache's {cache.max_len}"
            )
        binding = cache.binding
        if binding is None or cache.session is not self.session:
            # bind the buffers once per cache; each step rebinds only the ids, the length and logits
            binding = cache.binding = self.session.io_binding()
            cache.session = self.session
            for past, present, value in zip(self.past_names, self.present_names, cache.values, strict=True):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("past_sequence_length", np.array([cache.length], dtype=np.int64))
        binding.bind_output(self.output_names[0], "cpu")
        self.session.run_with_iobinding(binding)
        cache.length += ids.shape[1]
        return binding.get_outputs()[-1].numpy()  # logits: the output bound last

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        prefill_chunk: int | None = PREFILL_CHUNK,
    ) -> np.ndarray:
        """Greedy decoding: prefill the prompt (empty cache), then one token per step (in place on a
        :class:`KVCache` when the file shares its KV buffer).

        ``prefill_chunk``: a prompt longer than this is prefilled that many tokens per call (the
        same causal attention over the cache; None: one call). On SmolLM2 (2 threads, 512-token
        prompt) chunks of 128 took W4A16 from 863 to 775 ms and the int8-cache file from 1373 to
        1143 ms: ORT's kernels do better on shorter steps (BENCHMARKS.md). Only files with a shared
        KV buffer take chunks; the others prefill in one call.

        Returns ``[batch, prompt + new]`` token ids. Rows are unpadded and equally long; generation
        stops early only when every row has produced ``eos_token_id``.
        """
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"generate: prefill_chunk must be >= 1 or None, got {prefill_chunk}")
        ids = _numpy(input_ids).astype(np.int64)
        if self.shared_buffer:
            cache = self.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens)

            def advance(tokens: np.ndarray) -> np.ndarray:
                return self.step_inplace(tokens, cache)
        else:
            state = {"past": self.empty_cache(ids.shape[0])}

            def advance(tokens: np.ndarray) -> np.ndarray:
                logits, state["past"] = self.step(tokens, state["past"])
                return logits

        chunk = prefill_chunk if self.shared_buffer and prefill_chunk else ids.shape[1]
        for start in range(0, ids.shape[1], chunk):
            logits = advance(ids[:, start : start + chunk])
        tokens = [ids]
        done = np.zeros(ids.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            nxt = logits[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            tokens.append(nxt)
            if eos_token_id is not None:
                done |= nxt[:, 0] == eos_token_id
            if i + 1 == max_new_tokens or done.all():
                break
            logits = advance(nxt)
        return np.concatenate(tokens, axis=1)
