"""Quantizer math as pure tensor functions: weight RTN (with optional clip search), activation
fake-quant, SQNR. The reference implementations of the ``qcompile::`` ops (:mod:`qcompile.ops`) are
the primitives at the top of this file, so fake-quant here and the ops in a graph agree bit for bit.

Scale rules (signed grid ``qmin = -2^(b-1)``, ``qmax = 2^(b-1) - 1``, see :mod:`qcompile.quant.scheme`):

- symmetric: ``scale = absmax / ((qmax - qmin) / 2)``, zero point 0 — 8-bit ``absmax / 127.5``,
  4-bit ``absmax / 7.5``, then ``clamp(round(x / scale), qmin, qmax)``. The grid is used in full:
  ``-absmax`` lands on ``qmin`` exactly and ``+absmax`` rounds to ``qmax + 0.5`` and is clamped, an
  error of half a step, the same as any rounding. (docs/methods.md: absmax/7.5 moves SmolLM2 RTN W4 g64
  ppl from 42.95 with absmax/7 to 41.72.)
- asymmetric: range ``[min(x_min, 0), max(x_max, 0)]`` (always contains 0, so 0 is exact),
  ``scale = (max - min) / (qmax - qmin)``, ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``.

Either way, every x inside the range satisfies ``|x - x̂| ≤ scale / 2``. A range of zero (an all-zero
row, token or group) gets scale 1, so it quantizes to exact zeros instead of dividing by zero.
Rounding is half-to-even (``torch.round``), as ONNX QuantizeLinear does.

Groups: ``group_size = g > 0`` gives one scale per ``g`` consecutive input channels. When ``in % g``
is not 0 the last group is smaller (576 = 4·128 + 64: a final group of 64). Our choice: a smaller
final group, no padding — ``scale`` has ``ceil(in / g)`` columns and is expanded with
``repeat_interleave(g)`` then sliced to ``in`` (ONNX blocked DequantizeLinear has the same layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qcompile.quant.scheme import ActQuantSpec, WeightQuantSpec

# ---- primitives: the reference math of the qcompile:: ops ----------------------------------------


def expand_groups(param: Tensor, group_size: int, n: int) -> Tensor:
    """Expand a per-group ``param`` [..., ceil(n/g)] to [..., n] (ragged last group); g = 0: as is."""
    if group_size <= 0:
        return param
    groups = param.shape[-1]
    if groups != math.ceil(n / group_size):
        raise ValueError(
            f"{groups} groups of {group_size} do not cover {n} channels (expected {math.ceil(n / group_size)})"
        )
    return param.repeat_interleave(group_size, dim=-1)[..., :n]


def quantize_ref(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, group_size: int
) -> Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int8 (computed in float32)."""
    n = x.shape[-1]
    s = expand_groups(scale, group_size, n).float()
    zp = expand_groups(zero_point, group_size, n).float()
    q = torch.round(x.float() / s) + zp
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize_ref(q: Tensor, scale: Tensor, zero_point: Tensor, group_size: int) -> Tensor:
    """``(q - zero_point) * scale`` in ``scale``'s dtype (computed in float32)."""
    n = q.shape[-1]
    s = expand_groups(scale, group_size, n).float()
    zp = expand_groups(zero_point, group_size, n).float()
    return ((q.float() - zp) * s).to(scale.dtype)


def _storable(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` rounded to the dtype it is stored in (kept as float32); 0 (zero range, or an fp16
    underflow) becomes 1 so an all-zero row quantizes to exact zeros."""
    scale = scale.to(dtype).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def symmetric_qparams(
    absmax: Tensor, qmin: int, qmax: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``scale = absmax / ((qmax - qmin) / 2)`` (int8: /127.5, int4: /7.5), zero point 0 (int8).

    The scale is returned as float32 holding a value representable in ``dtype``.
    """
    scale = _storable(absmax.float() / ((qmax - qmin) / 2), dtype)
    return scale, torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)


def asymmetric_qparams(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Min/max affine: the range is widened to contain 0, ``scale = (hi - lo) / (qmax - qmin)``,
    ``zero_point = clamp(qmin - round(lo / scale), qmin, qmax)`` from the stored (``dtype``) scale."""
    lo = torch.clamp(lo.float(), max=0)
    hi = torch.clamp(hi.float(), min=0)
    scale = _storable((hi - lo) / (qmax - qmin), dtype)
    zp = (qmin - torch.round(lo / scale)).clamp_(qmin, qmax).to(torch.int8)
    return scale, zp


def choose_qparams_per_token_ref(x: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Dynamic per-token qparams: reduce the last dim (keepdim). scale in ``x.dtype``, zero point int8."""
    if symmetric:
        scale, zp = symmetric_qparams(x.abs().amax(dim=-1, keepdim=True), qmin, qmax, x.dtype)
    else:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        scale, zp = asymmetric_qparams(lo, hi, qmin, qmax, x.dtype)
    return scale.to(x.dtype), zp


# ---- weights ---------------------------------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """A quantized W [out, in]: ``W ≈ (q - zero_point) * scale``, groups expanded along ``in``.

    ``q`` int8 [out, in]; ``scale`` [out, G] in W's dtype and ``zero_point`` int8 [out, G] with G = 1
    (``group_size`` 0, per output channel) or ``ceil(in / group_size)``. ``clip_ratio`` [out, G] is
    the shrink factor the clip search kept (None without search).
    """

    q: Tensor
    scale: Tensor
    zero_point: Tensor
    group_size: int
    spec: WeightQuantSpec
    clip_ratio: Tensor | None = None

    def dequantize(self) -> Tensor:
        return dequantize_ref(self.q, self.scale, self.zero_point, self.group_size)


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """W [out, in] as [out, G, g], the ragged last group zero-padded (neutral: ranges contain 0)."""
    out_f, in_f = w.shape
    g = group_size if 0 < group_size else in_f
    groups = math.ceil(in_f / g)
    pad = groups * g - in_f
    return torch.nn.functional.pad(w, (0, pad)).view(out_f, groups, g)


def _qparams(
    wg: Tensor, spec: WeightQuantSpec, ratio: Tensor | float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Per-(row, group) scale (float32, representable in ``dtype``) and zero point of ``wg``
    [out, G, g], with the range shrunk by ``ratio``."""
    if spec.symmetric:
        return symmetric_qparams(wg.abs().amax(dim=-1) * ratio, spec.qmin, spec.qmax, dtype)
    return asymmetric_qparams(wg.amin(dim=-1) * ratio, wg.amax(dim=-1) * ratio, spec.qmin, spec.qmax, dtype)


def _fake_quant_grouped(wg: Tensor, scale: Tensor, zp: Tensor, spec: WeightQuantSpec) -> Tensor:
    s, z = scale.unsqueeze(-1), zp.unsqueeze(-1).float()
    return (torch.round(wg / s) + z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s)


def _hessian_blocks(xtx: Tensor, groups: int, g: int) -> Tensor:
    """The diagonal blocks [G, g, g] of ``XᵀX`` (zero-padded to ``G·g``), one per weight group."""
    n = xtx.shape[0]
    h = torch.nn.functional.pad(xtx.float(), (0, groups * g - n, 0, groups * g - n))
    return torch.stack([h[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(groups)])


def clip_objective(delta: Tensor, hessian_blocks: Tensor | None) -> Tensor:
    """Error of each (row, group) of ``delta = W - Ŵ`` [out, G, g] -> [out, G].

    Without calibration: the weight MSE ``Σ δ²``. With the blocks ``H_k`` of ``H = XᵀX``: the output
    error of the group's contribution, ``‖X_k δ_kᵀ‖² = δ_k H_k δ_kᵀ`` (AWQ's per-group clip objective;
    for per-channel weights it is the exact output error ``‖X (w - ŵ)ᵀ‖²`` of the row).
    """
    if hessian_blocks is None:
        return delta.pow(2).sum(-1)
    hd = torch.bmm(delta.transpose(0, 1), hessian_blocks)  # [G, out, g]
    return (hd * delta.transpose(0, 1)).sum(-1).transpose(0, 1)


def quantize_weight(
    w: Tensor, spec: WeightQuantSpec, samples: Tensor | None = None, xtx: Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of a linear's W [out, in] under ``spec`` (scale rules above).

    With ``spec.clip_search``, each (row, group) tries the shrink factors of ``spec.clip_grid`` and
    keeps the one with the least :func:`clip_objective`; ``samples`` X [k, in] (real input rows) or
    ``xtx`` (XᵀX [in, in], preferred when both are given) switch the objective from weight MSE to
    output error. 1.0 is tried first and only a strictly smaller error replaces it, so the search
    never does worse than plain RTN on its objective.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects W [out, in], got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    wg = _grouped(w.detach().float(), spec.group_size)
    groups, g = wg.shape[1], wg.shape[2]
    ratio = None
    if spec.clip_search:
        if xtx is None and samples is not None:
            xf = samples.detach().float().reshape(-1, in_f)
            xtx = xf.T @ xf
        blocks = _hessian_blocks(xtx.to(wg.device), groups, g) if xtx is not None else None
        ratio = _search_clip(wg, spec, blocks, w.dtype)
        scale, zp = _qparams(wg, spec, ratio, w.dtype)
    else:
        scale, zp = _qparams(wg, spec, 1.0, w.dtype)
    group_size = spec.group_size if 0 < spec.group_size else 0
    # The same float32 arithmetic as quantize_ref (the qcompile::quantize op), on the grouped view:
    # no repeat_interleave of the scales over a large W.
    q = (torch.round(wg / scale.unsqueeze(-1)) + zp.unsqueeze(-1).float()).clamp_(spec.qmin, spec.qmax)
    q = q.to(torch.int8).reshape(out_f, groups * g)[:, :in_f].contiguous()
    return QuantizedWeight(q, scale.to(w.dtype), zp, group_size, spec, ratio)


def _search_clip(wg: Tensor, spec: WeightQuantSpec, blocks: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Best shrink factor per (row, group): grid search, 1.0 first, strict improvement only."""
    grid = sorted(set(spec.clip_grid), reverse=True)
    best_err = torch.full(wg.shape[:2], math.inf, device=wg.device)
    best = torch.ones(wg.shape[:2], device=wg.device)
    for r in grid:
        scale, zp = _qparams(wg, spec, r, dtype)
        err = clip_objective(wg - _fake_quant_grouped(wg, scale, zp, spec), blocks)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


# ---- activations -----------------------------------------------------------------------------------


def static_per_tensor_qparams(
    lo: float, hi: float, spec: ActQuantSpec, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Calibrated per-tensor qparams from the observed range [lo, hi]: 0-d scale in ``dtype``, 0-d int8
    zero point. Symmetric uses ``absmax = max(|lo|, |hi|)``; asymmetric the min/max rule."""
    lo_t, hi_t = torch.tensor(float(lo)), torch.tensor(float(hi))
    if spec.symmetric:
        scale, zp = symmetric_qparams(torch.maximum(lo_t.abs(), hi_t.abs()), spec.qmin, spec.qmax, dtype)
    else:
        scale, zp = asymmetric_qparams(lo_t, hi_t, spec.qmin, spec.qmax, dtype)
    return scale.to(dtype), zp


def fake_quant_per_token(x: Tensor, spec: ActQuantSpec) -> Tensor:
    """Dynamic per-token quantize→dequantize, identical to choose_qparams → quantize → dequantize."""
    scale, zp = choose_qparams_per_token_ref(x, spec.qmin, spec.qmax, spec.symmetric)
    return dequantize_ref(quantize_ref(x, scale, zp, spec.qmin, spec.qmax, 0), scale, zp, 0)


def fake_quant_per_tensor(x: Tensor, spec: ActQuantSpec, lo: float, hi: float) -> Tensor:
    """Static per-tensor quantize→dequantize with qparams from a calibrated range [lo, hi]."""
    scale, zp = static_per_tensor_qparams(lo, hi, spec, x.dtype)
    return dequantize_ref(quantize_ref(x, scale, zp, spec.qmin, spec.qmax, 0), scale, zp, 0)


def fake_quant_activation(
    x: Tensor, spec: ActQuantSpec, static_range: tuple[float, float] | None = None
) -> Tensor:
    """``x`` after the activation scheme ``spec`` (unchanged for mode ``none``); static per tensor
    needs the calibrated ``static_range = (lo, hi)``."""
    if spec.mode == "none":
        return x
    if spec.mode == "dynamic_per_token":
        return fake_quant_per_token(x, spec)
    if static_range is None:
        raise ValueError("static_per_tensor needs the calibrated range (lo, hi) of the tensor")
    return fake_quant_per_tensor(x, spec, *static_range)


# ---- error -----------------------------------------------------------------------------------------


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − approx‖²)`` in dB (sums in float64).

    ``inf`` when ``approx == ref``; ``-inf`` when ``ref`` is all zeros but ``approx`` is not.
    """
    r = ref.detach().float()
    d = r - approx.detach().float()
    noise = torch.sum(d * d, dtype=torch.float64).item()
    signal = torch.sum(r * r, dtype=torch.float64).item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
