"""GEMM speed of the Triton kernels on a CUDA GPU: weight-only int4 (group 128) against cuBLAS fp16 and a
``torch.compile``d fp16 matmul, per linear shape and number of rows M.

    python benchmarks/triton_gemm.py                                   # every shape, M = 1 4 16 64 256
    python benchmarks/triton_gemm.py --shapes smollm2 --m 1 16 --rows fp16-cublas w4a16-g128
    python benchmarks/triton_gemm.py --out /tmp/triton_gemm.md

Shapes are ``K→N`` (in → out features): 4096→4096, 4096→11008, 11008→4096 (a 7B Llama's attention
and MLP projections) and SmolLM2-135M's 576→576 (q, o), 576→192 (k, v), 576→1536 (gate, up),
1536→576 (down). Every row of one (shape, M) computes ``x Ŵᵀ`` for the same fp16 activations x and
the same weights: Ŵ is the dequantized random int4 weight (symmetric, fp16 scales per group of 128),
so the dense rows multiply exactly the matrix the quantized rows hold, and the ``err`` column is each
row's ``max |y − y_cuBLAS| / max |y_cuBLAS|`` (fp16 rounding: ~1e-3; a broken kernel: O(1)).
Times are ``triton.testing.do_bench`` medians (ms → µs) after one untimed call (which autotunes the
Triton kernels and compiles the ``torch.compile`` row); ``× cuBLAS`` is cuBLAS's time over the row's.

Rows are a registry, :data:`ROWS`: name → :class:`Row` (a description and a factory). A factory takes
the :class:`Case` (x, Ŵ, the int4 weight in qcompile's storage) and returns a zero-argument callable
that runs the row's kernel; everything it prepares (packing, quantizing) happens before timing.
Another kernel's rows are added with the decorator, in this file or in a module imported before
:func:`main` runs::

    @row("w8a8-triton", "W8A8: int8 x per token, int8 W per channel, Triton")
    def _w8a8(case: Case):
        w8, s8 = my_quantize(case.w_hat)          # from the same Ŵ: the err column stays comparable
        return lambda: my_w8a8_op(case.x, w8, s8)

Without CUDA the script says so and exits 0 (nothing to measure; the kernels' correctness is tested on
CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo

SHAPES = {
    "llama7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
}
DEFAULT_M = [1, 4, 16, 64, 256]
GROUP = 128
BASELINE = "fp16-cublas"
_COMPILE_MODE = ["default"]  # set by --compile-mode before the rows are built


@dataclass
class Case:
    """One GEMM: ``y = x Ŵᵀ``, x fp16 ``[M, K]``; Ŵ fp16 ``[N, K]`` is the dequantized int4 weight held in
    qcompile's storage (``w4`` MatMulNBits uint8, ``scale4`` fp16 ``[N, K / 128]``, symmetric)."""

    m: int
    k: int
    n: int
    x: torch.Tensor
    w_hat: torch.Tensor
    w4: torch.Tensor
    scale4: torch.Tensor


@dataclass(frozen=True)
class Row:
    name: str
    description: str
    factory: Callable[[Case], Callable[[], torch.Tensor]]


ROWS: dict[str, Row] = {}


def row(name: str, description: str):
    """Decorator: register a benchmark row (module docstring)."""

    def wrap(factory: Callable[[Case], Callable[[], torch.Tensor]]):
        if name in ROWS:
            raise ValueError(f"benchmark row {name!r} is registered twice")
        ROWS[name] = Row(name, description, factory)
        return factory

    return wrap


# ---- the rows ------------------------------------------------------------------------------------------


@row(BASELINE, "cuBLAS fp16 `torch.mm(x, Ŵᵀ)`")
def _cublas(case: Case):
    w_t = case.w_hat.t()
    return lambda: torch.mm(case.x, w_t)


def _matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


@row("fp16-compile", "`torch.compile`d fp16 `x @ Ŵᵀ` (static shapes, mode from --compile-mode)")
def _compiled(case: Case):
    fn = torch.compile(_matmul, dynamic=False, mode=_COMPILE_MODE[0])
    return lambda: fn(case.x, case.w_hat)


@row("w4a16-g128", "qcompile Triton `qlinear_w`, int4 symmetric, group 128 (split-K GEMV for M ≤ 8)")
def _w4a16(case: Case):
    from qcompile.backends.triton.layout import repack_weight
    from qcompile.backends.triton.wo_linear import QLINEAR_W_TRITON

    packed = repack_weight(case.w4.cpu(), case.scale4.cpu(), None, 4, case.k, GROUP)
    w, scales = packed.w.to(case.x.device), packed.scales.to(case.x.device)
    return lambda: QLINEAR_W_TRITON(case.x, w, scales, None, None, 4, case.k, GROUP)


# ---- measuring -----------------------------------------------------------------------------------------


def make_case(m: int, k: int, n: int, device: torch.device, seed: int = 0) -> Case:
    from qcompile.quant.packing import dequantize_weight, pack_int4_weight

    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, -(-k // GROUP), generator=gen) * 0.02 + 0.002).half()
    w4 = pack_int4_weight(q, GROUP)
    w_hat = dequantize_weight(w4, scale, None, 4, k, GROUP)  # fp16, the reference's rounding
    x = torch.randn(m, k, generator=gen).half()
    return Case(m, k, n, x.to(device), w_hat.to(device).contiguous(), w4.to(device), scale.to(device))


def measure(rows: list[Row], case: Case) -> dict[str, tuple[float, float]]:
    """row name -> (median µs, max |y − y_baseline| / max |y_baseline|)."""
    import triton.testing

    results, baseline = {}, None
    for r in rows:
        fn = r.factory(case)
        y = fn()  # untimed: autotuning, compilation
        torch.cuda.synchronize()
        if baseline is None:
            baseline = _cublas(case)()
        err = float((y.float() - baseline.float()).abs().max() / baseline.float().abs().max())
        results[r.name] = (triton.testing.do_bench(fn) * 1e3, err)
    return results


def format_table(
    rows: list[Row], table: list[tuple[int, int, int, dict]], argv: list[str], device_name: str
) -> str:
    import triton

    names = [r.name for r in rows]
    head = ["K→N", "M", *[f"{n} µs" for n in names]]
    head += [f"{n} × cuBLAS" for n in names if n != BASELINE and BASELINE in names]
    head += [f"{n} err" for n in names if n != BASELINE]
    lines = [
        f"{device_name}; torch {torch.__version__}, triton {triton.__version__}. "
        "do_bench median, fp16 activations, int4 weights symmetric with fp16 scales per group of 128.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for k, n, m, res in table:
        cells = [f"{k}→{n}", str(m), *[f"{res[name][0]:.1f}" for name in names]]
        if BASELINE in names:
            cells += [f"{res[BASELINE][0] / res[name][0]:.2f}" for name in names if name != BASELINE]
        cells += [f"{res[name][1]:.1e}" for name in names if name != BASELINE]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rows: " + "; ".join(f"`{r.name}`: {r.description}" for r in rows)]
    lines += [
        "",
        "command: `python benchmarks/triton_gemm.py " + " ".join(shlex.quote(a) for a in argv) + "`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--m", nargs="*", type=int, default=DEFAULT_M, help="rows of x (tokens)")
    parser.add_argument("--rows", nargs="*", default=None, help=f"default: all of {', '.join(ROWS)}")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode of the fp16-compile row (max-autotune-no-cudagraphs tunes Triton "
        "matmul templates too, minutes per shape)",
    )
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "triton_gemm: no CUDA device here; this benchmark times GPU kernels, so there is nothing to run."
        )
        return 0
    unknown = [name for name in args.rows or [] if name not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; registered: {', '.join(ROWS)}")
    rows = [ROWS[name] for name in (args.rows or ROWS)]
    _COMPILE_MODE[0] = args.compile_mode
    # one compiled graph per (shape, M): raise Dynamo's per-function recompile limit above their number
    limit = len(args.m) * sum(len(SHAPES[s]) for s in args.shapes) + 8
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(limit, getattr(torch._dynamo.config, knob)))
    device = torch.device("cuda")
    table = []
    for shape_set in args.shapes:
        for k, n in SHAPES[shape_set]:
            for m in args.m:
                res = measure(rows, make_case(m, k, n, device))
                table.append((k, n, m, res))
                print(
                    f"{k}→{n} M={m}: " + ", ".join(f"{name} {t:.1f} µs" for name, (t, _) in res.items()),
                    flush=True,
                )
    text = format_table(rows, table, argv, torch.cuda.get_device_name())
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
