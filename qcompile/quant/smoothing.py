"""Smoothing groups and scales (SmoothQuant, SmoothQuant+): *what* T is. The equivalence engine
decides where it goes (``qcompile.equivalence``).

A :class:`SmoothingGroup` is one region of the engine plus the calibration facts the scales need:
the sinks' input statistics, seen per *sink input channel*. Scales are computed per sink input
channel as well; for v→o with GQA they are tied across each KV group before the engine sees them
(the engine refuses untied ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from qcompile.analysis.structure import Structure
from qcompile.equivalence import (
    Region,
    region_for_norm,
    region_for_up_down,
    region_for_v_o,
)
from qcompile.ir import QGraph
from qcompile.quant.calibration import LinearInputStats
from qcompile.quant.rtn import fake_quant_activation, quantize_weight
from qcompile.quant.scheme import ActQuantSpec, WeightQuantSpec, scheme_string

GroupKind = Literal["qkv", "gate_up", "norm", "down", "vo"]
GROUP_KINDS: tuple[str, ...] = ("qkv", "gate_up", "norm", "down", "vo")
# SmoothQuant clamps both statistics at 1e-5 so s is finite and non-zero.
STAT_FLOOR = 1e-5


@dataclass
class SmoothingGroup:
    """One smoothing point: a region (producer → consumer linears) and how its channels map."""

    kind: str
    region: Region
    layer: int | None
    # For v→o: query heads per KV head and head_dim, to tie scales across each GQA group.
    kv_group: int = 1
    head_dim: int = 0

    @property
    def sinks(self) -> list[str]:
        return self.region.sinks


@dataclass
class SkippedGroup:
    kind: str
    where: str
    reason: str


@dataclass
class GroupChoice:
    """What the pass decided for one group (for the report)."""

    group: str
    kind: str
    layer: int | None
    alpha: float | None  # None: left unsmoothed (the search found smoothing does not help)
    s_min: float
    s_max: float
    error_before: float | None = None  # search objective with s = 1
    error_after: float | None = None  # search objective at the chosen α
    errors: dict[str, float] = field(default_factory=dict)


def _norm_kind(st: Structure, sinks: list[str]) -> str:
    roles = {st.linears[s].role for s in sinks}
    if roles <= {"q", "k", "v"}:
        return "qkv"
    if roles <= {"gate", "up", "fc1"}:
        return "gate_up"
    return "norm"


def find_groups(
    st: Structure, kinds: tuple[str, ...] | list[str]
) -> tuple[list[SmoothingGroup], list[SkippedGroup]]:
    """Every smoothing point of the requested kinds, from the Structure (never from module names).

    Norm groups: every norm whose output feeds linears (``qkv``: the attention-input norm, ``gate_up``:
    the MLP-input norm, ``norm``: any other, e.g. a norm before a plain classifier); the final norm
    before ``lm_head`` is left alone (lm_head stays in float by default). Linear groups: ``down``
    (``up`` rows → ``down`` columns through ``act(gate) * up``) and ``vo`` (v rows → o columns per
    head, GQA-tied).
    """
    groups: list[SmoothingGroup] = []
    skipped: list[SkippedGroup] = []
    for norm in st.norms.values():
        sinks = [c for c in norm.consumers if c in st.linears]
        if not sinks or any(st.linears[c].role == "lm_head" for c in sinks):
            continue
        kind = _norm_kind(st, sinks)
        if kind in kinds:
            groups.append(SmoothingGroup(kind, region_for_norm(st, norm.output), norm.layer))
    for att in st.attentions:
        if "vo" in kinds:
            groups.append(
                SmoothingGroup("vo", region_for_v_o(st, att), att.layer, att.kv_group_size, att.head_dim)
            )
    for mlp in st.mlps:
        if "down" not in kinds:
            continue
        if mlp.kind != "gated":
            reason = f"plain MLP: a diagonal scale does not pass {mlp.activation} between fc1 and fc2"
            skipped.append(SkippedGroup("down", f"layer {mlp.layer}", reason))
        else:
            groups.append(SmoothingGroup("down", region_for_up_down(st, mlp), mlp.layer))
    return groups, skipped


def _group_max(x: torch.Tensor, group: SmoothingGroup) -> torch.Tensor:
    """Per sink channel → max over each GQA group, broadcast back (v→o scales must be tied)."""
    if group.kind != "vo" or group.kv_group == 1:
        return x
    heads = x.numel() // group.head_dim
    per_head = x.reshape(heads // group.kv_group, group.kv_group, group.head_dim)
    tied = per_head.amax(dim=1, keepdim=True).expand_as(per_head)
    return tied.reshape(-1)


def activation_absmax(stats: dict[str, LinearInputStats], group: SmoothingGroup) -> torch.Tensor:
    """max|X_j| per sink input channel (every sink of a group reads the same input)."""
    x = stats[group.sinks[0]].channel_absmax.double()
    for sink in group.sinks[1:]:
        x = torch.maximum(x, stats[sink].channel_absmax.double())
    return _group_max(x, group)


def weight_absmax(qgraph: QGraph, st: Structure, group: SmoothingGroup) -> torch.Tensor:
    """max|W_{:,j}| over all rows of all sinks (docs/methods.md notation)."""
    cols = [
        qgraph.get_constant(st.linears[s].weight).detach().abs().amax(dim=0).double() for s in group.sinks
    ]
    return _group_max(torch.stack(cols).amax(dim=0), group)


def qqq_scales(act_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """QQQ's adaptive smoothing: ``s_j = max(max|X_j| / t, 1)`` — only channels whose range exceeds
    the threshold ``t`` are scaled, down to exactly ``t``; every other channel keeps ``s_j = 1``.
    (QQQ writes ``max(max X_j / t, −min X_j / t, 1)``, which is the same with ``max|X_j|``.)"""
    if not threshold > 0:
        raise ValueError(f"qqq_scales: threshold must be > 0, got {threshold}")
    return (act_absmax.double() / threshold).clamp(min=1.0)


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant eq. 4: ``s_j = max|X_j|^α / max|W_j|^(1−α)``, both clamped at 1e-5."""
    a = act_absmax.clamp(min=STAT_FLOOR)
    w = w_absmax.clamp(min=STAT_FLOOR)
    return a.pow(alpha) / w.pow(1.0 - alpha)


@dataclass(frozen=True)
class SinkQuantizers:
    """The quantizers the search scores one sink linear under: its weight grid (RTN) and its input
    activation scheme."""

    weight: WeightQuantSpec
    act: ActQuantSpec

    def short(self) -> str:
        return scheme_string(self.weight, self.act)


@dataclass
class SearchObjective:
    """SmoothQuant+'s criterion for one group: the quantized output error of its sinks on real input
    rows, under each sink's own quantizers: ``Σ_sinks ‖X Wᵀ − Q_a(X/s) Q_w(W diag(s))ᵀ‖²``. A sink
    missing from ``sinks`` stays float and adds no error.

    ``rotation = "hadamard"`` (SmoothRot) measures the error *after* the online Hadamard the rotate
    pass puts on the sink's input (R4 on the down_proj input): ``Q_a((X/s) H) Q_w((W diag(s)) H)ᵀ``.
    The float product is unchanged (``H Hᵀ = I``); only the quantizers see the difference.
    """

    sinks: Mapping[str, SinkQuantizers]
    rotation: Literal["none", "hadamard"] = "none"
    _matrices: dict[int, torch.Tensor | None] = field(default_factory=dict, repr=False, compare=False)

    def rotation_matrix(self, n: int) -> torch.Tensor | None:
        """The float64 ``[n, n]`` map applied after smoothing; None without rotation, or where R4 would
        skip the width (no Hadamard of any divisor > 1)."""
        if self.rotation == "none":
            return None
        if n not in self._matrices:
            from qcompile.quant.rotation import online_matrix  # lazy: the default objective needs no Hadamard

            self._matrices[n] = online_matrix(n)
        return self._matrices[n]

    def error(
        self,
        qgraph: QGraph,
        st: Structure,
        group: SmoothingGroup,
        stats: dict[str, LinearInputStats],
        s: torch.Tensor,
    ) -> float:
        total = 0.0
        for sink in group.sinks:
            quantizers = self.sinks.get(sink)
            if quantizers is None:
                continue
            x = stats[sink].samples.double()
            w = qgraph.get_constant(st.linears[sink].weight).detach().double()
            ref = x @ w.T
            xs, ws = x / s, w * s
            h = self.rotation_matrix(x.shape[1])
            if h is not None:  # SmoothRot: H (x ⊘ s) online, (W diag(s)) H merged
                xs, ws = xs @ h, ws @ h
            xs = xs.float()
            static = None
            if quantizers.act.mode == "static_per_tensor":
                static = (float(xs.min()), float(xs.max()))
            xq = fake_quant_activation(xs, quantizers.act, static).double()
            wq = quantize_weight(ws.float(), quantizers.weight).dequantize().double()
            total += float(((ref - xq @ wq.T) ** 2).sum())
        return total


def _grid_search(
    qgraph: QGraph,
    st: Structure,
    group: SmoothingGroup,
    stats: dict[str, LinearInputStats],
    objective: SearchObjective,
    candidates: Iterable[tuple[float, torch.Tensor]],
) -> tuple[float | None, torch.Tensor, dict[str, float]]:
    """Score ``(parameter, scales)`` candidates against leaving the group alone (s = 1), which always
    competes: the chosen point never has a larger objective than the identity. Returns the chosen
    parameter (None: leave the group alone), its scales, and every candidate's error by ``f"{p:g}"``."""
    ones = torch.ones_like(activation_absmax(stats, group))
    best_param: float | None = None
    best_s = ones
    best_err = objective.error(qgraph, st, group, stats, ones)
    errors = {"none": best_err}
    for param, s in candidates:
        err = objective.error(qgraph, st, group, stats, s)
        errors[f"{param:g}"] = err
        if err < best_err and math.isfinite(err):
            best_param, best_s, best_err = param, s, err
    return best_param, best_s, errors


def search_alpha(
    qgraph: QGraph,
    st: Structure,
    group: SmoothingGroup,
    stats: dict[str, LinearInputStats],
    objective: SearchObjective,
    grid: list[float],
) -> tuple[float | None, torch.Tensor, dict[str, float]]:
    """Grid search over α (SmoothQuant+); the identity (no smoothing) competes too."""
    act = activation_absmax(stats, group)
    wmax = weight_absmax(qgraph, st, group)
    candidates = ((alpha, smoothing_scales(act, wmax, alpha)) for alpha in grid)
    return _grid_search(qgraph, st, group, stats, objective, candidates)


def search_threshold(
    qgraph: QGraph,
    st: Structure,
    group: SmoothingGroup,
    stats: dict[str, LinearInputStats],
    objective: SearchObjective,
    ratios: list[float],
) -> tuple[float | None, torch.Tensor, dict[str, float]]:
    """QQQ's search: thresholds ``t = r · max_j max|X_j|`` for ``r`` in ``ratios`` (``r ≥ 1`` is the
    identity, which competes anyway), scored by the same objective as :func:`search_alpha`. Returns
    the chosen ratio (None: leave the group alone), the scales and every candidate's error."""
    act = activation_absmax(stats, group)
    top = float(act.max())
    usable = [r for r in ratios if r < 1] if top > 0 else []
    candidates = ((r, qqq_scales(act, r * top)) for r in usable)
    return _grid_search(qgraph, st, group, stats, objective, candidates)
