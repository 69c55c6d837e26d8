"""Outlier math on one linear's input statistics (docs/methods.md, "Outlier detection").

Two different things make an activation hard to quantize, and they call for different cures:

- **channel outliers**: a few input channels whose abs-max is far above the layer's median channel
  (ratio ``channel_absmax / median(channel_absmax)``, outlier when > ~20×). They are systematic —
  the same channels on every token — so a per-channel scale can move them into the weights
  (SmoothQuant) or a rotation can spread them (QuaRot).
- **massive activations** (Sun et al., 2024): a few *tokens* (often the first, or delimiters) whose
  values are hundreds to thousands of times the median, in a few channels. They are rare, so a
  per-channel scale sized for them wastes the grid on every other token.

The token × channel spikes are located exactly from the two abs-max vectors: a value above a
threshold ``T`` lies in a token with ``token_absmax > T`` *and* a channel with ``channel_absmax > T``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qcompile.quant.calibration import LinearInputStats

__all__ = ["ChannelOutlier", "MassiveActivations", "OutlierReport", "find_outliers"]

# A median of zero (dead channels, ReLU) would make every ratio infinite; ratios are taken against
# at least this, so they stay finite and JSON-able.
_MEDIAN_FLOOR = 1e-12
# How many massive-token positions a report lists (the count is always exact).
_MAX_LISTED_TOKENS = 16


@dataclass
class ChannelOutlier:
    channel: int
    absmax: float
    ratio: float  # absmax / median channel abs-max of the layer


@dataclass
class MassiveActivations:
    """Tokens whose abs-max exceeds ``threshold_ratio`` × the median token abs-max."""

    count: int  # tokens above the threshold
    n_tokens: int
    max_value: float  # the largest |x| seen (the worst token's abs-max)
    max_ratio: float  # max_value / median token abs-max
    median_token_absmax: float
    threshold_ratio: float
    # Channels with some value above the threshold: the columns the spikes sit in.
    channels: list[int] = field(default_factory=list)
    # Positions (over all calibration tokens, flattened) of the first few massive tokens.
    tokens: list[int] = field(default_factory=list)


@dataclass
class OutlierReport:
    """Outliers of one linear's input; written to ``node.meta["qcompile"]["outliers"]``."""

    node: str
    in_features: int
    median_channel_absmax: float
    max_ratio: float  # the largest channel ratio
    threshold_ratio: float
    top_channels: list[ChannelOutlier]  # top-k channels by ratio, largest first
    outlier_channels: list[int]  # every channel with ratio > threshold, largest ratio first
    # None when calibration's token abs-max no longer describes this input (a scaling made it stale).
    massive: MassiveActivations | None = None

    @property
    def has_channel_outliers(self) -> bool:
        return bool(self.outlier_channels)

    @property
    def has_massive(self) -> bool:
        return self.massive is not None and self.massive.count > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (plain ints, floats, lists)."""
        return asdict(self)


def _median(x: torch.Tensor) -> float:
    """The true median (mean of the middle two for even sizes), unlike ``torch.median``."""
    return float(torch.quantile(x.double(), 0.5)) if x.numel() else 0.0


def find_outliers(
    stats: LinearInputStats,
    *,
    channel_ratio: float = 20.0,
    top_k: int = 8,
    massive_ratio: float = 100.0,
) -> OutlierReport:
    """Channel outliers and massive activations of one linear's input, from its calibration stats."""
    absmax = stats.channel_absmax.double()
    median = _median(absmax)
    ratio = absmax / max(median, _MEDIAN_FLOOR)
    order = torch.argsort(ratio, descending=True, stable=True)
    k = min(top_k, absmax.numel())
    top = [ChannelOutlier(int(c), float(absmax[c]), float(ratio[c])) for c in order[:k].tolist()]
    outliers = [int(c) for c in order.tolist() if float(ratio[c]) > channel_ratio]
    return OutlierReport(
        node=stats.node,
        in_features=int(absmax.numel()),
        median_channel_absmax=median,
        max_ratio=float(ratio.max()) if ratio.numel() else 0.0,
        threshold_ratio=channel_ratio,
        top_channels=top,
        outlier_channels=outliers,
        massive=None if stats.token_absmax_stale else _massive(stats, massive_ratio),
    )


def _massive(stats: LinearInputStats, massive_ratio: float) -> MassiveActivations:
    tokens = stats.token_absmax.double()
    median = _median(tokens)
    threshold = massive_ratio * max(median, _MEDIAN_FLOOR)
    hot_tokens = torch.nonzero(tokens > threshold).flatten()
    hot_channels: list[int] = []
    if hot_tokens.numel():
        hot_channels = torch.nonzero(stats.channel_absmax.double() > threshold).flatten().tolist()
    max_value = float(tokens.max()) if tokens.numel() else 0.0
    return MassiveActivations(
        count=int(hot_tokens.numel()),
        n_tokens=int(tokens.numel()),
        max_value=max_value,
        max_ratio=max_value / max(median, _MEDIAN_FLOOR),
        median_token_absmax=median,
        threshold_ratio=massive_ratio,
        channels=[int(c) for c in hot_channels],
        tokens=[int(t) for t in hot_tokens[:_MAX_LISTED_TOKENS].tolist()],
    )
