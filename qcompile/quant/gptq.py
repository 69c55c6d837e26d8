"""GPTQ weight quantization: column by column with error feedback through the inverse Hessian.

GPTQ (Frantar et al. 2022), Alg. 1. For a linear ``y = x Wᵀ`` and calibration inputs X, the output
error of a quantized row is ``(w - ŵ) H (w - ŵ)ᵀ`` with ``H = 2 XᵀX / n_tokens``. Columns are
quantized one at a time; the error a column makes, divided by the pivot of the upper Cholesky factor
``U`` of ``H⁻¹`` (``U`` such that ``H⁻¹ = Uᵀ U``), is fed into the columns still to come:
``W[:, j] -= (w_i - ŵ_i) / U_ii · U_ij`` (OBS update, eq. 3 of the paper in Cholesky form).

How this implementation reads the paper:

- ``H = 2·xtx / n_tokens`` from calibration's float64 ``Σ xᵀx``; a dead input (``H_jj = 0``: never
  non-zero on the calibration data) gets ``H_jj = 1`` and its weight column is zeroed — its value
  does not change the output on that data, and zero is exact on every grid.
- damping ``λ = damp · mean(diag H)`` on the diagonal (paper: 1 %); the Cholesky factors are computed
  in float64, the column loop runs in float32.
- lazy batch updates (Alg. 1): columns go in blocks of ``block_size``; inside a block each column
  receives the errors of the block's earlier columns when the loop reaches it, the rest of the matrix
  receives the whole block's errors once per block (one matmul). Memory beyond a float32 copy of W is
  ``H`` and ``U`` [in, in] (at most three float64 [in, in] matrices while factoring) plus a
  [block, out] error buffer; the caller (the quantize pass) goes linear by linear.
- groups: a group's scale / zero point come from the *error-updated* weights of all its columns at the
  moment the loop first reaches one of them (without act-order: when it enters the group, as the
  reference code does), with the scale rules of :mod:`qcompile.quant.rtn` and its ragged last group.
  Per channel is one group spanning all columns (so its qparams are those of the original W).
- act-order: columns in order of decreasing ``diag(H)``. Groups stay contiguous in the stored format
  (``q``, ``scale`` [out, G] as for RTN; no ``g_idx``): with ``static_groups`` (default) every
  group's qparams are taken from the original W before any column moves — the usual "static groups"
  variant; without it a group's qparams are fixed when the permuted loop first reaches one of its
  columns (from updated weights, as above). ``static_groups`` only matters with ``act_order``.
  On SmolLM2-135M W4 g128, act-order is what makes GPTQ beat RTN (ppl 41.7 vs RTN 45.7; column
  order 46.6): the shipped ``w4a16-gptq`` recipe turns it on.
- ``spec.clip_search``: every group's qparams are fixed before the loop (static, from the original
  W) by RTN's clip search (:func:`qcompile.quant.rtn.quantize_weight`) with the output-error
  objective on ``xtx``'s diagonal blocks; GPTQ's error feedback then runs on that clipped grid. Without
  it a group's range is the full min/max (or absmax) of its columns. On SmolLM2-135M W4 g128 asym
  act-order: see the ``w4a16-gptq`` recipe for the measured effect.

With ``xtx = c·I`` (no correlation between inputs) ``U`` is diagonal, no error is propagated and the
result equals :func:`qcompile.quant.rtn.quantize_weight` (RTN) bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qcompile.quant.rtn import QuantizedWeight, asymmetric_qparams, quantize_weight, symmetric_qparams
from qcompile.quant.scheme import WeightQuantSpec

__all__ = [
    "GPTQError",
    "damp_",
    "gptq_quantize",
    "group_qparams",
    "hessian_from_xtx",
    "inverse_hessian_factor",
]


class GPTQError(ValueError):
    """GPTQ could not run on this weight (bad shapes, no tokens, H not positive definite)."""


def hessian_from_xtx(xtx: Tensor, n_tokens: int) -> tuple[Tensor, Tensor]:
    """``H = 2·xtx / n_tokens`` in float64, dead inputs (``H_jj = 0``) set to ``H_jj = 1``.

    Returns ``(H, dead)`` with ``dead`` a bool mask over the inputs; ``xtx`` is not modified.
    GPTQ (Frantar et al. 2022), Alg. 1: ``H = 2 X Xᵀ`` (their X is [in, tokens]), here averaged.
    """
    h = xtx.to(torch.float64) * (2.0 / n_tokens)
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    return h, dead


def damp_(h: Tensor, damp: float) -> Tensor:
    """Add ``λ = damp · mean(diag H)`` to H's diagonal, in place (GPTQ: 1 % of the mean, for stability)."""
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    return h


def inverse_hessian_factor(h: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``) of a damped H, as float32.

    GPTQ (Frantar et al. 2022), Alg. 1 line 2 (``H⁻¹ ← Cholesky(H⁻¹)ᵀ``), without forming H⁻¹: with
    J the order-reversing permutation and ``J H J = L Lᵀ``, ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and
    ``J L⁻¹ J`` is upper triangular with a positive diagonal, so it *is* U (the factor is unique).
    One Cholesky and one triangular solve in float64 instead of Cholesky, inverse, Cholesky: half the
    work, and no ``cholesky_inverse``, which stalls for seconds on a contended multi-threaded CPU.
    Raises :class:`GPTQError` when H is not positive definite.
    """
    lower, info = torch.linalg.cholesky_ex(h.to(torch.float64).flip(0, 1))
    if int(info) != 0 or not bool(torch.isfinite(lower).all()):
        raise GPTQError(
            "the damped Hessian is not positive definite; raise the damping (gptq_damp, e.g. 0.1) "
            "or calibrate on more tokens"
        )
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)
    del lower, eye
    return lower_inv.flip(0, 1).to(torch.float32)


def group_qparams(cols: Tensor, spec: WeightQuantSpec, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale (float32, representable in ``dtype``) and zero point per row of ``cols`` [out, k]: the
    rules of :mod:`qcompile.quant.rtn` (symmetric ``absmax / ((qmax - qmin) / 2)``, or min/max)."""
    if spec.symmetric:
        return symmetric_qparams(cols.abs().amax(dim=1), spec.qmin, spec.qmax, dtype)
    return asymmetric_qparams(cols.amin(dim=1), cols.amax(dim=1), spec.qmin, spec.qmax, dtype)


@dataclass
class _Groups:
    """Per-(row, group) qparams over the *original* column order, filled as groups are reached.

    ``of_position[p]`` is the group of the column at loop position ``p``; ``members[k]`` the loop
    positions of group ``k``'s columns (contiguous without act-order).
    """

    scale: Tensor  # [out, G] float32
    zero_point: Tensor  # [out, G] int8
    ready: list[bool]
    of_position: list[int]
    members: list[Tensor]

    @classmethod
    def layout(cls, out_f: int, in_f: int, group_size: int, perm: Tensor, device: torch.device) -> _Groups:
        g = group_size if group_size > 0 else in_f
        n_groups = math.ceil(in_f / g)
        group_of_column = torch.arange(in_f, device=device) // g
        of_position = group_of_column[perm]
        members = [torch.nonzero(of_position == k).flatten() for k in range(n_groups)]
        return cls(
            scale=torch.ones(out_f, n_groups, device=device),
            zero_point=torch.zeros(out_f, n_groups, dtype=torch.int8, device=device),
            ready=[False] * n_groups,
            of_position=of_position.tolist(),
            members=members,
        )

    def fix_all(self, w: Tensor, group_size: int, spec: WeightQuantSpec, dtype: torch.dtype) -> None:
        """Static groups: every group's qparams from ``w`` in original column order."""
        g = group_size if group_size > 0 else w.shape[1]
        for k in range(len(self.ready)):
            self.set(k, w[:, k * g : (k + 1) * g], spec, dtype)

    def set(self, k: int, cols: Tensor, spec: WeightQuantSpec, dtype: torch.dtype) -> None:
        self.scale[:, k], self.zero_point[:, k] = group_qparams(cols, spec, dtype)
        self.ready[k] = True


@dataclass
class _Solver:
    """The state of one GPTQ run. W is held transposed, ``wt`` [in, out] in loop order, so a column of
    W is a contiguous row.

    Inside a block the error feedback is *left-looking*: column ``p`` is brought up to date when the
    loop reaches it, ``w_p - Σ_{j<p} e_j U_jp`` over the block's earlier columns (one small
    vector-matrix product), instead of a rank-1 update of all remaining block columns after each
    column. The same sums in another order, with one kernel per column and no large element-wise
    kernels in the loop (those hit thread-pool barriers thousands of times: 30× slower on a
    contended CPU). After the block, the rest of W gets the block's update at once (Alg. 1, lazy batch).
    """

    wt: Tensor  # [in, out] float32, loop order; holds the updates of the blocks already done
    u: Tensor  # [in, in] float32, upper Cholesky factor of H⁻¹, loop order
    groups: _Groups
    spec: WeightQuantSpec
    dtype: torch.dtype
    qt: Tensor  # [in, out] int8, loop order

    def current_columns(self, positions: Tensor, err: Tensor, b0: int, b1: int) -> Tensor:
        """W's columns at loop ``positions`` (none quantized yet), updated with the errors of the
        block so far (``err`` [block, out], zero for the columns still to come), as [out, k]."""
        return (self.wt[positions] - self.u[b0:b1, positions].T @ err).T

    def run_block(self, b0: int, b1: int) -> None:
        """GPTQ (Frantar et al. 2022), Alg. 1 inner loop on columns [b0, b1), then the lazy update."""
        err = torch.zeros(b1 - b0, self.wt.shape[1], device=self.wt.device)
        qmin, qmax = self.spec.qmin, self.spec.qmax
        for i, p in enumerate(range(b0, b1)):
            k = self.groups.of_position[p]
            if not self.groups.ready[k]:
                cols = self.current_columns(self.groups.members[k], err, b0, b1)
                self.groups.set(k, cols, self.spec, self.dtype)
            scale, zp = self.groups.scale[:, k], self.groups.zero_point[:, k].float()
            col = self.wt[p] - self.u[b0:p, p] @ err[:i]  # Alg. 1 line 7, applied when it is needed
            # The arithmetic of quantizers.quantize_ref: round(w / s) + zp, clamped, in float32.
            q = torch.round(col / scale).add_(zp).clamp_(qmin, qmax)
            self.qt[p] = q.to(torch.int8)
            err[i] = (col - (q - zp) * scale) / self.u[p, p]  # Alg. 1: E = (W - Q) / [H⁻¹]_qq
        self.wt[b1:].addmm_(self.u[b0:b1, b1:].T, err, alpha=-1.0)  # Alg. 1: lazy batch update


def _check_inputs(w: Tensor, xtx: Tensor, n_tokens: int, block_size: int, damp: float) -> None:
    if w.dim() != 2:
        raise GPTQError(f"gptq_quantize expects W [out, in], got shape {tuple(w.shape)}")
    if tuple(xtx.shape) != (w.shape[1], w.shape[1]):
        raise GPTQError(f"xtx has shape {tuple(xtx.shape)} but W has {w.shape[1]} inputs")
    if n_tokens <= 0:
        raise GPTQError(f"n_tokens must be positive, got {n_tokens}")
    if block_size <= 0 or damp < 0:
        raise GPTQError(f"need block_size > 0 and damp >= 0, got {block_size} and {damp}")
    if not bool(torch.isfinite(xtx).all()):
        raise GPTQError("xtx holds inf or NaN; the calibration inputs overflowed")


def gptq_quantize(
    w: Tensor,
    xtx: Tensor,
    n_tokens: int,
    spec: WeightQuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = True,
) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022), Alg. 1: quantize W [out, in] given ``xtx = Σ xᵀx`` [in, in] over
    ``n_tokens`` calibration rows (see the module docstring for groups, act-order and damping).

    Returns the same :class:`~qcompile.quant.rtn.QuantizedWeight` as RTN (``q`` int8 [out, in],
    ``scale`` [out, G] in W's dtype, ``zero_point`` int8 [out, G]); ``dequantize()`` gives exactly
    the weights the error feedback was computed with. ``w`` and ``xtx`` are not modified.
    """
    _check_inputs(w, xtx, n_tokens, block_size, damp)
    out_f, in_f = w.shape
    device = w.device
    h, dead = hessian_from_xtx(xtx.to(device), n_tokens)
    wf = w.detach().to(torch.float32).clone()
    wf[:, dead] = 0.0  # GPTQ reference: an input never seen contributes nothing; 0 is exact
    group_size = spec.group_size if spec.group_size > 0 else 0
    perm = torch.arange(in_f, device=device)
    if act_order:  # GPTQ "act-order": the columns with the largest H_jj first
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    groups = _Groups.layout(out_f, in_f, group_size, perm, device)
    if spec.clip_search:  # clipped static grid from the original W, output-error objective
        rtn = quantize_weight(wf, spec, xtx=xtx.to(device))
        groups.scale.copy_(rtn.scale.float())
        groups.zero_point.copy_(rtn.zero_point)
        groups.ready = [True] * len(groups.ready)
    elif act_order and static_groups:
        groups.fix_all(wf, group_size, spec, w.dtype)  # before any column moves or is updated
    if act_order:
        h = h[perm][:, perm]
    u = inverse_hessian_factor(damp_(h, damp))
    del h
    qt = torch.empty(in_f, out_f, dtype=torch.int8, device=device)
    solver = _Solver(wf.T[perm].contiguous(), u, groups, spec, w.dtype, qt)
    del wf
    for b0 in range(0, in_f, block_size):
        solver.run_block(b0, min(b0 + block_size, in_f))
    q = torch.empty(out_f, in_f, dtype=torch.int8, device=device)
    q[:, perm] = qt.T
    return QuantizedWeight(q, groups.scale.to(w.dtype), groups.zero_point, group_size, spec)
