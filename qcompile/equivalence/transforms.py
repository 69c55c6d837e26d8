"""The transforms ``T`` the engine inserts as ``T·T⁻¹`` at a linear's input, in float64.

Convention (docs/architecture.md, "The equivalence engine"): for ``y = x Wᵀ``, the producer side absorbs
``x → x T`` and every consumer absorbs ``W → W T⁻ᵀ``, so ``(x T)(W T⁻ᵀ)ᵀ = x Wᵀ``.

``T`` is defined on the *source channels*: the last dim of the region's source outputs (for the
v→o region, v's output channels, ``num_kv_heads·head_dim``). A consumer may read those channels
in another order or replicated (GQA ``repeat_kv``); the walker hands :meth:`Transform.inverse_transpose`
a ``channel_map`` (consumer input channel → source channel) for that.

| class            | T                         | producer ``x → x T``     | consumer ``W → W T⁻ᵀ``        |
|------------------|---------------------------|--------------------------|-------------------------------|
| DiagonalScale    | diag(1/s)  (SmoothQuant)  | ``x / s``                | ``W[:, j] · s_j``             |
| DenseOrthogonal  | Q          (QuaRot R1)    | ``x Q``                  | ``W Q``                       |
| BlockOrthogonal  | blockdiag(H_k) (R2)       | ``x_k H_k`` per head k   | ``W_h H_{k(h)}`` per head h   |
| Composite        | diag(1/s)·Q (SmoothRot)   | ``(x / s) Q``            | ``(W diag(s)) Q``             |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompile.equivalence.errors import Refusal

F64 = torch.float64
# max |QᵀQ − I| accepted as orthogonal (a float32 QR is ~1e-6 off); beyond it W Q is not W Q⁻ᵀ.
ORTHOGONALITY_TOL = 1e-4


class Transform:
    """Base class. Subclasses are frozen dataclasses holding float64 tensors."""

    # T is diagonal: commutes with elementwise products (SmoothQuant's `silu(gate) * up`).
    diagonal: bool = False
    # T is orthogonal: preserves every row's norm, so it commutes with a weightless RMSNorm (QuaRot).
    orthogonal: bool = False
    # Diagonal with every s_j > 0: commutes with positively homogeneous ops (ReLU).
    positive: bool = False

    @property
    def channels(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def block(self) -> int | None:
        """Width of the channel groups T mixes: 1 (diagonal), head_dim (per head), None (all)."""
        raise NotImplementedError  # pragma: no cover - interface

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x T`` on the last dim (source channels). Producers: embedding ``E T``, writer ``(Wᵀ T)ᵀ``."""
        raise NotImplementedError  # pragma: no cover - interface

    def inverse_transpose(self, w: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
        """``W T⁻ᵀ`` for a consumer whose input channel i is source channel ``channel_map[i]``."""
        raise NotImplementedError  # pragma: no cover - interface

    def row_error(self, row: torch.Tensor) -> str | None:
        """Why a tensor whose last dim holds source channels ``row`` cannot carry T as a last-dim map.

        ``None`` when every group of channels T mixes sits whole, in order, in the row.
        """
        block = self.block
        if block == 1:
            return None
        if block is None:
            if row.numel() == self.channels and torch.equal(row, torch.arange(self.channels)):
                return None
            return f"its last dim holds {_channels_text(row)}, not all {self.channels} channels in order"
        if row.numel() % block:
            return f"its last dim ({row.numel()}) is not a whole number of {block}-channel heads"
        chunks = row.reshape(-1, block)
        starts = chunks[:, :1]
        if bool((starts % block != 0).any()) or not torch.equal(
            chunks - starts, torch.arange(block).expand_as(chunks)
        ):
            return (
                f"its last dim splits or reorders the {block}-channel heads T acts on ({_channels_text(row)})"
            )
        return None

    def __str__(self) -> str:
        return self.describe()


def _channels_text(row: torch.Tensor) -> str:
    vals = row.tolist()
    shown = ", ".join(str(v) for v in vals[:6])
    return f"source channels [{shown}{', …' if len(vals) > 6 else ''}] ({len(vals)})"


def _head_blocks(channel_map: torch.Tensor, block: int) -> torch.Tensor:
    """Source block index of each consumer block (the map is block-aligned: checked by ``row_error``)."""
    return channel_map.reshape(-1, block)[:, 0] // block


@dataclass(frozen=True)
class DiagonalScale(Transform):
    """``T = diag(1/s)``: SmoothQuant eq. 3 — producer channel j divided by s_j, consumer column j times s_j."""

    s: torch.Tensor  # [C], float64, finite and non-zero

    diagonal = True

    @property
    def channels(self) -> int:
        return int(self.s.numel())

    @property
    def block(self) -> int:
        return 1

    @property
    def positive(self) -> bool:  # type: ignore[override]
        return bool((self.s > 0).all())

    def describe(self) -> str:
        return "diag(1/s)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.s

    def inverse_transpose(self, w: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
        return w * self.s[channel_map]


@dataclass(frozen=True)
class DenseOrthogonal(Transform):
    """``T = Q`` over all channels: QuaRot/SpinQuant R1 (``E ← E Q``, readers ``W ← W Q``, writers ``W ← Qᵀ W``)."""

    q: torch.Tensor  # [C, C], float64, QᵀQ = I

    orthogonal = True

    @property
    def channels(self) -> int:
        return int(self.q.shape[0])

    @property
    def block(self) -> None:
        return None

    def describe(self) -> str:
        return "Q"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q

    def inverse_transpose(self, w: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
        # Q⁻ᵀ = Q. The walker only lets identity maps reach here (``row_error``).
        return w @ self.q


@dataclass(frozen=True)
class BlockOrthogonal(Transform):
    """``T = blockdiag(H_0, …, H_{n-1})``, one ``head_dim × head_dim`` block per source head: R2.

    Per KV head k, v rows ``← H_kᵀ``; per query head h, o columns ``← H_{k(h)}`` (QuaRot step 3).
    """

    blocks: torch.Tensor  # [n, d, d], float64, each orthogonal

    orthogonal = True

    @property
    def channels(self) -> int:
        return int(self.blocks.shape[0] * self.blocks.shape[1])

    @property
    def block(self) -> int:
        return int(self.blocks.shape[1])

    def describe(self) -> str:
        return f"per-head H ({self.blocks.shape[0]}×{self.block}×{self.block})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = self.blocks.shape[:2]
        split = x.reshape(*x.shape[:-1], n, d)
        return torch.einsum("...nd,nde->...ne", split, self.blocks).reshape(x.shape)

    def inverse_transpose(self, w: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
        d = self.block
        blocks = self.blocks[_head_blocks(channel_map, d)]  # [heads of the consumer, d, d]
        split = w.reshape(w.shape[0], -1, d)
        return torch.einsum("ohd,hde->ohe", split, blocks).reshape(w.shape)


@dataclass(frozen=True)
class Composite(Transform):
    """``T = diag(1/s)·R``: scale, then rotate (SmoothRot / OSTQuant). ``T⁻ᵀ = diag(s)·R`` for orthogonal R."""

    scale: DiagonalScale
    rotation: DenseOrthogonal | BlockOrthogonal

    @property
    def channels(self) -> int:
        return self.scale.channels

    @property
    def block(self) -> int | None:
        return self.rotation.block

    def describe(self) -> str:
        return f"diag(1/s)·{self.rotation.describe()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation.forward(self.scale.forward(x))

    def inverse_transpose(self, w: torch.Tensor, channel_map: torch.Tensor) -> torch.Tensor:
        return self.rotation.inverse_transpose(self.scale.inverse_transpose(w, channel_map), channel_map)


# ---- constructors (validate, convert to float64) -------------------------------------------------


def diagonal_scale(s: torch.Tensor) -> DiagonalScale:
    s64 = torch.as_tensor(s).detach().to("cpu", F64).reshape(-1)
    if not bool(torch.isfinite(s64).all()) or bool((s64 == 0).any()):
        raise Refusal(
            "the scales s must be finite and non-zero (T = diag(1/s) must be invertible)",
            "clamp s away from 0 (SmoothQuant clamps both statistics at 1e-5)",
        )
    return DiagonalScale(s64)


def _orthogonality_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[-1], dtype=F64)
    return float((q.transpose(-1, -2) @ q - eye).abs().max())


def _check_orthogonal(q: torch.Tensor) -> None:
    if q.shape[-1] != q.shape[-2]:
        raise Refusal(f"Q must be square, got {tuple(q.shape)}", "pass a square orthogonal matrix")
    err = _orthogonality_error(q)
    if err > ORTHOGONALITY_TOL:
        raise Refusal(
            f"Q is not orthogonal (max |QᵀQ − I| = {err:.2e} > {ORTHOGONALITY_TOL:g}), so W Q is not W Q⁻ᵀ",
            "orthonormalise it in float64 first (e.g. torch.linalg.qr)",
        )


def dense_orthogonal(q: torch.Tensor) -> DenseOrthogonal:
    q64 = torch.as_tensor(q).detach().to("cpu", F64)
    if q64.dim() != 2:
        raise Refusal(f"Q must be a matrix, got shape {tuple(q64.shape)}", "pass a [C, C] orthogonal matrix")
    _check_orthogonal(q64)
    return DenseOrthogonal(q64)


def block_orthogonal(blocks: torch.Tensor, num_blocks: int) -> BlockOrthogonal:
    """``blocks`` is one ``[d, d]`` map shared by every head, or ``[num_blocks, d, d]``, one per head."""
    b64 = torch.as_tensor(blocks).detach().to("cpu", F64)
    if b64.dim() == 2:
        b64 = b64.expand(num_blocks, *b64.shape).clone()
    if b64.dim() != 3 or b64.shape[0] != num_blocks:
        raise Refusal(
            f"per-head maps must be [d, d] or [{num_blocks}, d, d], got {tuple(b64.shape)}",
            "pass one head_dim × head_dim orthogonal map, or one per source (KV) head",
        )
    _check_orthogonal(b64)
    return BlockOrthogonal(b64)
