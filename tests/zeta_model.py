"""A Llama-like model written from scratch with meaningless attribute names.

The structural analysis must give it the same roles as transformers' Llama: it may display module
names but never match them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain


def _spin(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Mixer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.alpha = nn.Linear(dim, dim, bias=False)
        self.beta = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.gamma = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.delta = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        a = self.alpha(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.beta(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.gamma(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        a = a * cos + _spin(a) * sin
        k = k * cos + _spin(k) * sin
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, s, self.hd).reshape(b, self.heads, s, self.hd)
        v = v[:, :, None].expand(b, self.kv_heads, rep, s, self.hd).reshape(b, self.heads, s, self.hd)
        out = F.scaled_dot_product_attention(a, k, v, is_causal=True)
        return self.delta(out.transpose(1, 2).reshape(b, s, -1))


class Feed(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.p = nn.Linear(dim, hidden, bias=False)
        self.r = nn.Linear(dim, hidden, bias=False)
        self.s = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.s(self.r(x) * F.silu(self.p(x)))


class Cell(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.n1, self.n2 = Scale(dim), Scale(dim)
        self.mix = Mixer(dim, heads, kv_heads)
        self.ff = Feed(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.n1(x), cos, sin)
        return x + self.ff(self.n2(x))


class Zeta(nn.Module):
    def __init__(
        self,
        vocab: int = 96,
        dim: int = 48,
        hidden: int = 80,
        layers: int = 2,
        heads: int = 6,
        kv_heads: int = 2,
    ):
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(vocab, dim)
        self.stack = nn.ModuleList(Cell(dim, hidden, heads, kv_heads) for _ in range(layers))
        self.fin = Scale(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight
        hd = dim // heads
        self.register_buffer("freq", 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).float()
        ang = torch.outer(pos, self.freq)
        ang = torch.cat((ang, ang), dim=-1)
        cos, sin = ang.cos()[None, None], ang.sin()[None, None]
        x = self.tok(ids)
        for cell in self.stack:
            x = cell(x, cos, sin)
        return self.head(self.fin(x))
