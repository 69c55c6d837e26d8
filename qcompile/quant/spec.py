"""Quantization specs: what the ``annotate`` pass decides for one quantizable edge and the ``quantize``
pass realises (PT2E style: annotate first, convert second).

One frozen dataclass per kind of edge, stored on the node it quantizes
(``node.meta["qcompile"]["qspec"]``, :mod:`qcompile.ir.keys`):

- :class:`LinearQuantSpec` on an ``aten.linear``: its weight (:class:`WeightQuantSpec`: bits, groups
  with a ragged last group, symmetry, clip search), its input activation (:class:`ActQuantSpec`: bits,
  none / dynamic per token / static per tensor, symmetry) and the weight method (RTN, or GPTQ with
  :class:`GPTQSpec`);
- :class:`EmbeddingQuantSpec` on an ``aten.embedding``: the table's weight spec;
- :class:`KVCacheQuantSpec` on the new keys / values entering a KV cache: 8-bit, static, symmetric, one
  scale per channel (kv head × head dim) — the only int8 cache ONNX Runtime's GroupQueryAttention
  stores, so any other scheme is refused.

Every spec renders the scheme strings of :mod:`qcompile.quant.scheme` (``w4g128a+clip-a16``,
``w8g64s``, ``kv8c``), which reports, IR dumps and the ONNX exporter read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qcompile.quant.scheme import ActQuantSpec, IntegerGrid, WeightQuantSpec, scheme_string

WeightMethod = Literal["rtn", "gptq"]
WEIGHT_METHODS: tuple[str, ...] = ("rtn", "gptq")
# The one KV cache ONNX Runtime's GroupQueryAttention stores quantized (per channel, int8).
KV_CACHE_BITS = 8


@dataclass(frozen=True)
class GPTQSpec:
    """GPTQ's knobs (Frantar et al. 2022, Alg. 1; :mod:`qcompile.quant.gptq`).

    Attributes:
        block_size: columns per lazy-update block.
        damp: ``λ = damp · mean(diag H)`` added to H's diagonal.
        act_order: quantize columns by decreasing ``diag(H)`` (groups stay contiguous: static groups).
    """

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.damp < 0:
            raise ValueError(
                f"gptq_block_size must be > 0 and gptq_damp >= 0, got {self.block_size} and {self.damp}"
            )


@dataclass(frozen=True)
class LinearQuantSpec:
    """How one linear is quantized: weight, input activation and weight method (``gptq`` None: RTN)."""

    weight: WeightQuantSpec = field(default_factory=WeightQuantSpec)
    act: ActQuantSpec = field(default_factory=lambda: ActQuantSpec(mode="none"))
    gptq: GPTQSpec | None = None

    @property
    def method(self) -> WeightMethod:
        return "rtn" if self.gptq is None else "gptq"

    @property
    def needs_hessian(self) -> bool:
        """GPTQ reads the calibrated ``XᵀX`` of the linear's input."""
        return self.gptq is not None

    @property
    def needs_act_range(self) -> bool:
        """Static activations take their one scale from the calibrated range."""
        return self.act.mode == "static_per_tensor"

    def scheme(self) -> str:
        """``w4g128s-a16``, ``w8cs-a8ts`` (:func:`qcompile.quant.scheme.scheme_string`)."""
        return scheme_string(self.weight, self.act)

    def describe(self) -> str:
        """The scheme and the method, e.g. ``w4g128a+clip-a16 gptq``."""
        return f"{self.scheme()} {self.method}"


@dataclass(frozen=True)
class EmbeddingQuantSpec:
    """How an embedding table [vocab, dim] is quantized: RTN on the weight grid (groups along dim).

    A 4-bit table must be symmetric: its ONNX lookup (GatherBlockQuantized) takes no zero points.
    """

    weight: WeightQuantSpec

    def __post_init__(self) -> None:
        if self.weight.bits == 4 and not self.weight.symmetric:
            raise ValueError("a 4-bit embedding must be symmetric (its ONNX lookup takes no zero points)")

    def scheme(self) -> str:
        """``w8g64s`` (the weight part of a scheme string: a lookup has no activation)."""
        return self.weight.short()

    def describe(self) -> str:
        return f"{self.scheme()} rtn"


@dataclass(frozen=True)
class KVCacheQuantSpec(IntegerGrid):
    """The keys or values entering a KV cache: ``bits``-bit, static, symmetric, one scale per channel
    (kv head × head dim) from calibration ranges (``s = max|x| / 127.5``)."""

    bits: int = KV_CACHE_BITS

    def __post_init__(self) -> None:
        if self.bits != KV_CACHE_BITS:
            raise ValueError(
                f"a {self.bits}-bit KV cache is not supported; only an {KV_CACHE_BITS}-bit cache (what ONNX "
                "Runtime's GroupQueryAttention stores per channel) is"
            )

    def scheme(self) -> str:
        """``kv8c``: 8-bit, per channel (kv head × head dim), symmetric, static."""
        return f"kv{self.bits}c"

    def describe(self) -> str:
        return f"{self.scheme()} static"


QuantSpec = LinearQuantSpec | EmbeddingQuantSpec | KVCacheQuantSpec
