"""A decode step with its KV cache as explicit tensors: the program an ONNX decode loop runs.

``capture`` records ``model(input_ids)`` with ``use_cache=False``; a generation loop needs another
program: ``(input_ids, past K/V) -> (logits, present K/V)``. :class:`DecoderStep` wraps a
transformers causal LM so that the cache is plain tensors in and out (a ``DynamicCache`` is built
from them inside the traced forward, so torch.export sees only tensor ops: one ``cat`` per layer
and K/V), and :func:`capture_decoder` captures it into an ordinary QGraph, which every pass and
recipe then treats like any other.

One program serves prefill and decode: the past length is a dynamic dim and may be 0 (prefill
with an empty cache), positions start at the past length, and transformers builds the causal mask
for ``seq`` new tokens over ``past + seq`` keys. Inputs are right-aligned, unpadded batches (every
row has the same length); a padded batch would need an attention-mask input (not done yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import qcompile
from qcompile.ir import QGraph, keys


@dataclass(frozen=True)
class CacheLayout:
    """Shape facts of the KV cache: per layer a key and a value ``[batch, kv_heads, past, head_dim]``
    (``dtype`` int8 for a file whose cache is quantized, KV-cache annotations, :mod:`qcompile.passes.annotate`)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    def empty(self, batch: int, past: int = 0) -> tuple[torch.Tensor, ...]:
        """Zeros of the right shape: ``past = 0`` is the empty cache a prefill starts from."""
        shape = (batch, self.num_kv_heads, past, self.head_dim)
        return tuple(torch.zeros(shape, dtype=self.dtype) for _ in range(2 * self.num_layers))

    def input_names(self) -> list[str]:
        return ["input_ids"] + [
            f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")
        ]

    def dynamic_shapes(self) -> tuple[dict[int, Any], ...]:
        """One Dim each for batch, new tokens and past length, shared by every cache tensor."""
        from torch.export import Dim

        batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
        return ({0: batch, 1: seq},) + tuple({0: batch, 2: past} for _ in range(2 * self.num_layers))

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


def cache_layout(model: torch.nn.Module) -> CacheLayout:
    """The cache layout of a transformers decoder, from its config."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError(f"cache_layout: {type(model).__name__} has no transformers config")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    dtype = next(model.parameters()).dtype
    return CacheLayout(cfg.num_hidden_layers, kv_heads, head_dim, dtype)


class DecoderStep(torch.nn.Module):
    """``(input_ids, past) -> (logits, present)``; ``past``/``present`` are flat tuples
    ``(k0, v0, k1, v1, …)``. With ``last_logits_only`` only the last position's logits are computed
    (transformers' ``logits_to_keep=1``): generation needs no more, and a 512-token prefill then
    skips 511 rows of the vocabulary-sized lm_head product."""

    def __init__(self, model: torch.nn.Module, last_logits_only: bool = True) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.logits_to_keep = 1 if last_logits_only else 0

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs)
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=self.logits_to_keep)
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return out.logits, tuple(present)


def example_decoder_inputs(
    layout: CacheLayout, batch: int = 2, past: int = 3, seq: int = 4, vocab: int = 256
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Inputs to trace a decode step with: every dim ≥ 2 and distinct, so none is specialised."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    shape = (batch, layout.num_kv_heads, past, layout.head_dim)
    if layout.dtype.is_floating_point:
        kv = tuple(
            torch.randn(shape, generator=gen, dtype=layout.dtype) for _ in range(2 * layout.num_layers)
        )
    else:  # an integer (int8) cache
        info = torch.iinfo(layout.dtype)
        kv = tuple(
            torch.randint(info.min, info.max + 1, shape, generator=gen, dtype=layout.dtype)
            for _ in range(2 * layout.num_layers)
        )
    return ids, kv


def capture_decoder(model: torch.nn.Module, *, last_logits_only: bool = True) -> QGraph:
    """Capture a transformers causal LM's decode step (see :class:`DecoderStep`) into a QGraph.

    ``qgraph.info[keys.INFO_DECODER]`` holds the :class:`CacheLayout`; the graph's inputs are
    ``(input_ids, (k0, v0, …))`` and its outputs ``(logits, (k0', v0', …))``.
    """
    layout = cache_layout(model)
    step = DecoderStep(model, last_logits_only)
    example = example_decoder_inputs(layout, vocab=min(256, model.config.vocab_size))
    qgraph = qcompile.capture(step, example)
    qgraph.info[keys.INFO_DECODER] = layout
    return qgraph


def flat_cache_inputs(input_ids: Any, past: tuple) -> tuple:
    """The decoder QGraph's positional inputs (for ``QGraph.__call__`` and ``export_onnx``)."""
    return (input_ids, tuple(past))
