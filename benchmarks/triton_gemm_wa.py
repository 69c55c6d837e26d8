"""Triton integer-activation GEMMs (``qcompile.backends.triton.wa_linear``) against cuBLAS on one GPU.

    python benchmarks/triton_gemm_wa.py                                # 4096² and Llama-3-8B MLP shapes
    python benchmarks/triton_gemm_wa.py --shapes 4096x4096 --m 1 16 256

Rows: M tokens × a weight N×K (``N x K`` as nn.Linear stores it). Columns (milliseconds, median of
``triton.testing.do_bench``, autotuning done before timing):

- ``fp16 mm``: cuBLAS ``x @ Wᵀ`` in fp16 — the baseline a W8A8 kernel must beat to be worth it;
- ``int_mm``: ``torch._int_mm`` (cuBLASLt int8 → int32, no epilogue; it takes only M > 16);
- ``w8a8``: ``qcompile_triton::qlinear_wa`` on already-quantized int8 activations (per-token scales,
  per-channel int8 weights, scales and bias in the epilogue, fp16 out), and its speedup over fp16;
- ``quant + w8a8``: ``quantize_per_token`` then ``qlinear_wa`` (two launches: what the graph does
  without fusion);
- ``fused``: ``dyn_quant_linear`` (float x in, one launch);
- ``w4a8 g128``: QQQ's scheme, int4 weights (MatMulNBits nibbles) in groups of 128, int8 activations.

Before anything is timed every Triton output is checked against the registry reference
(``qcompile::qlinear_wa``, run on the same GPU) — relative max error below 1e-2 of the output's
range, the fp16 output's own rounding being ~5e-4 — and the fused output against the two-launch one.
Without CUDA (or under ``TRITON_INTERPRET=1``) the script says so and exits 0: timings of the
interpreter mean nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

import torch

DEFAULT_SHAPES = ["4096x4096", "14336x4096", "4096x14336"]  # N x K: attention proj, Llama-3-8B up, down
DEFAULT_M = [1, 8, 16, 32, 64, 128, 256]
TOLERANCE = 1e-2


def _weights(n: int, k: int, gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Random int8 per-channel and int4 g128 weights with their scales (float16, as fold_qdq stores them)."""
    from qcompile.quant.packing import pack_int4_weight

    q8 = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    s8 = (torch.rand(n, 1, generator=gen) * 1e-3 + 1e-4).half()
    q4 = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    s4 = (torch.rand(n, -(-k // 128), generator=gen) * 1e-2 + 1e-3).half()
    bias = (torch.randn(n, generator=gen) * 0.1).half()
    return {
        "q8": q8.to(device),
        "s8": s8.to(device),
        "w4": pack_int4_weight(q4, 128).to(device),
        "s4": s4.to(device),
        "bias": bias.to(device),
    }


def _check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
    if err > TOLERANCE:
        raise SystemExit(
            f"{name}: relative max error {err:.2e} vs the qlinear_wa reference exceeds {TOLERANCE}"
        )


def _row(shape: str, m: int, w: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
    """Check, then time, every column for one shape and M."""
    import triton.testing

    from qcompile.backends.triton import wa_linear as T

    k = w["q8"].shape[1]
    p8, p4, bias = w["p8"], w["p4"], w["bias"]
    x = torch.randn(m, k, generator=gen).half().to(w["q8"].device)
    xq, xs, _ = T.quantize_per_token(x, -128, 127, True)

    def w8a8():
        return T.qlinear_wa(xq, xs, None, p8["w"], p8["w_scale"], None, bias, 8, k, 0)

    def two_launches():
        q, s, _ = T.quantize_per_token(x, -128, 127, True)
        return T.qlinear_wa(q, s, None, p8["w"], p8["w_scale"], None, bias, 8, k, 0)

    def fused():
        return T.dyn_quant_linear(x, -128, 127, True, p8["w"], p8["w_scale"], None, bias, 8, k, 0)

    def w4a8():
        return T.qlinear_wa(xq, xs, None, p4["w"], p4["w_scale"], None, bias, 4, k, 128)

    ref8 = torch.ops.qcompile.qlinear_wa(xq, xs, None, w["q8"], w["s8"], None, bias, 8, k, 0)
    ref4 = torch.ops.qcompile.qlinear_wa(xq, xs, None, w["w4"], w["s4"], None, bias, 4, k, 128)
    _check(f"w8a8 {shape} M={m}", w8a8(), ref8)
    _check(f"w4a8 {shape} M={m}", w4a8(), ref4)
    bench = triton.testing.do_bench
    return {
        "shape": shape,
        "M": m,
        "fp16 mm": bench(lambda: x @ w["w16"].T),
        "int_mm": bench(lambda: torch._int_mm(xq, w["q8"].T)) if m > 16 else None,
        "w8a8": bench(w8a8),
        "quant + w8a8": bench(two_launches),
        "fused": bench(fused),
        "w4a8 g128": bench(w4a8),
        "fused == 2 launches": torch.equal(fused(), two_launches()),
    }


def w8a8_rows(shapes: list[str] = DEFAULT_SHAPES, ms: list[int] = DEFAULT_M) -> list[dict[str, Any]]:
    """One row per (shape, M): times in ms of every column of the module docstring."""
    from qcompile.backends.triton import wa_linear as T

    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        w = _weights(n, k, gen, torch.device("cuda"))
        w["w16"] = (w["q8"].float() * w["s8"].float()).half()
        w["p8"] = T.prepare_weight(w["q8"], w["s8"], 8, k, 0, need_colsum=False)
        w["p4"] = T.prepare_weight(w["w4"], w["s4"], 4, k, 128, need_colsum=False)
        for m in ms:
            rows.append(_row(shape, m, w, gen))
            print(f"  {shape} M={m} done", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = ["fp16 mm", "int_mm", "w8a8", "quant + w8a8", "fused", "w4a8 g128"]
    head = (
        "| N x K | M | "
        + " | ".join(f"{c} (ms)" for c in cols)
        + " | w8a8 vs fp16 | fused vs fp16 | fused exact |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 5)]
    for r in rows:
        cells = " | ".join("—" if r[c] is None else f"{r[c]:.4f}" for c in cols)
        lines.append(
            f"| {r['shape']} | {r['M']} | {cells} | {r['fp16 mm'] / r['w8a8']:.2f}× | "
            f"{r['fp16 mm'] / r['fused']:.2f}× | {'yes' if r['fused == 2 launches'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="N x K weight shapes")
    parser.add_argument("--m", nargs="+", type=int, default=DEFAULT_M, help="token counts")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print(
            "TRITON_INTERPRET=1: the interpreter's timings mean nothing; unset it to benchmark. Nothing run."
        )
        return 0
    if not torch.cuda.is_available():
        print("No CUDA device: the Triton integer GEMMs need an NVIDIA GPU to be timed. Nothing run.")
        return 0
    import triton

    print(f"`python {' '.join(shlex.quote(a) for a in sys.argv)}`\n")
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
        "times: triton.testing.do_bench medians, fp16 activations and outputs\n"
    )
    print(markdown(w8a8_rows(args.shapes, args.m)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
