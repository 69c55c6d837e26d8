"""What every Triton kernel module shares: where the kernels run, the dtypes they take, how a runtime
input's dtype / shape is read from an fx node, and float rounding that matches the GPU under the
interpreter."""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

# Under TRITON_INTERPRET=1 (the CPU tests) kernels run in numpy: one small config each, no tuning.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_device_reason(device: torch.device) -> str | None:
    """None when Triton kernels can run on ``device``: CUDA (ROCm reports as cuda too), or any CPU tensor
    under ``TRITON_INTERPRET=1``; else the reason."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return None
    return f"Triton kernels run on CUDA devices (or on CPU under TRITON_INTERPRET=1), not on {device}"


def _val(value: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value
    val = getattr(value, "meta", {}).get("val") if hasattr(value, "meta") else None
    return val if isinstance(val, Tensor) else None


def runtime_dtype(value: object) -> torch.dtype | None:
    """The dtype of a runtime input handed to ``supports``: a tensor's, or an fx node's ``meta["val"]``'s;
    None when unknown."""
    val = _val(value)
    return val.dtype if val is not None else None


def runtime_shape(value: object) -> tuple[int, ...] | None:
    """The shape of a constant tensor or of an fx node's ``meta["val"]`` (None when unknown)."""
    val = _val(value)
    return tuple(val.shape) if val is not None else None


@triton.jit
def bf16_rne(v):
    """fp32 ``v`` rounded to bfloat16's precision (nearest even), kept in fp32. Done on the bits
    because the interpreter truncates fp32 -> bf16 casts where GPUs (and torch) round."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
