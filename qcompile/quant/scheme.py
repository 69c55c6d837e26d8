"""Quantization schemes as small data classes: what a weight or an activation is quantized to.

Integer grid (both symmetric and asymmetric, weights and activations): signed ``b``-bit,
``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1`` (4-bit: [-8, 7]; 8-bit: [-128, 127]), stored in an int8
container. Zero points are int8 and always lie in [qmin, qmax]; asymmetric 4-bit maps to ONNX's
uint4 by adding 8 to both ``q`` and the zero point.

Scheme strings (``node.meta["qcompile"]["quant"]``, reports, IR dumps) read left to right:

- weight: ``w{bits}`` + ``c`` (per output channel) or ``g{size}`` (per group of input channels) +
  ``s`` (symmetric) or ``a`` (asymmetric), + ``+clip`` when the range was searched;
- activation: ``a16`` (not quantized) or ``a{bits}`` + ``t`` (dynamic per token) or ``p`` (static
  per tensor) + ``s`` / ``a``.

e.g. ``w8cs-a8ts`` (W8A8: per-channel int8 weights, dynamic per-token int8 activations),
``w4g128s-a16`` (W4A16 group 128), ``w4g64a+clip-a8ts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ActMode = Literal["dynamic_per_token", "static_per_tensor", "none"]
ACT_MODES: tuple[str, ...] = ("dynamic_per_token", "static_per_tensor", "none")

# Shrink factors tried by the clip search, 1.0 (plain RTN) first so ties keep the full range.
DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 4) for i in range(11))  # 1.0 … 0.75


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer grid ``(qmin, qmax)`` of a ``bits``-bit quantizer."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 (int8 container), got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class IntegerGrid:
    """``qmin`` / ``qmax`` of a spec's signed ``bits``-bit grid (:func:`qrange`)."""

    bits: int

    @property
    def qmin(self) -> int:
        return qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits)[1]


@dataclass(frozen=True)
class WeightQuantSpec(IntegerGrid):
    """Round-to-nearest weight quantization of a linear's W [out, in].

    Attributes:
        bits: 2..8 (4 and 8 in the recipes).
        symmetric: symmetric (zero point 0, ``scale = absmax / ((qmax - qmin) / 2)``) or asymmetric
            (``scale = (max - min) / (qmax - qmin)`` over a range that always contains 0).
        group_size: 0 = one scale per output channel; g > 0 = one per group of g input channels, the
            last group ragged when ``in % g != 0`` (576 with g = 128: 4 groups of 128 and one of 64).
        clip_search: search a shrink factor of the range per (row, group), keeping the one with the
            least weight MSE, or least output error when calibration inputs are given.
        clip_grid: the shrink factors tried; must contain 1.0 (so the search never loses to RTN).
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int = 0
    clip_search: bool = False
    clip_grid: tuple[float, ...] = field(default=DEFAULT_CLIP_GRID)

    def __post_init__(self) -> None:
        qrange(self.bits)
        if self.group_size < 0:
            raise ValueError(f"group_size must be 0 (per channel) or positive, got {self.group_size}")
        if self.clip_search and (1.0 not in self.clip_grid or not all(0 < r <= 1 for r in self.clip_grid)):
            raise ValueError(f"clip_grid must hold 1.0 and factors in (0, 1], got {self.clip_grid}")

    def short(self) -> str:
        """``w4g128s``, ``w8cs``, ``w4g64a+clip`` (see the module docstring)."""
        gran = f"g{self.group_size}" if self.group_size else "c"
        clip = "+clip" if self.clip_search else ""
        return f"w{self.bits}{gran}{'s' if self.symmetric else 'a'}{clip}"


@dataclass(frozen=True)
class ActQuantSpec(IntegerGrid):
    """Quantization of a linear's input activation.

    Attributes:
        bits: 2..8 (ignored when ``mode == "none"``).
        mode: ``dynamic_per_token`` (scale from each token row's range at run time),
            ``static_per_tensor`` (one scale from the calibrated range of the tensor)
            or ``none`` (activations stay float: W-only quantization, ``a16``).
        symmetric: same scale rules as :class:`WeightQuantSpec`.
    """

    bits: int = 8
    mode: ActMode = "dynamic_per_token"
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ACT_MODES:
            raise ValueError(f"act mode must be one of {', '.join(ACT_MODES)}, got {self.mode!r}")
        if self.mode != "none":
            qrange(self.bits)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def short(self) -> str:
        """``a16``, ``a8ts``, ``a4ps`` (see the module docstring)."""
        if not self.enabled:
            return "a16"
        kind = "t" if self.mode == "dynamic_per_token" else "p"
        return f"a{self.bits}{kind}{'s' if self.symmetric else 'a'}"


def scheme_string(weight: WeightQuantSpec, act: ActQuantSpec) -> str:
    """The short scheme name written on a quantized linear, e.g. ``w4g128s-a8ts``."""
    return f"{weight.short()}-{act.short()}"
