"""``make demo``: the main job on the packaged default — SmolLM2-135M and WikiText-2.

Loads the model (fetching its wheel once), captures it, runs the float recipe and prints the
structural summary, checks the captured graph against eager, then measures perplexity on the test
split (seq 1024 × 8 windows by default; FP32 ≈ 29.2 under our protocol), and finally quantizes with
two recipes (W8A8 SmoothQuant, W4A16 SmoothQuant+ then GPTQ) on a small calibration budget and prints the
perplexity table. ``benchmarks/ppl.py`` runs every recipe at the full budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class DemoOptions:
    seq_len: int = 1024
    windows: int = 8
    progress: bool = True
    # Quantized recipes shown after the float number, on a small calibration budget.
    recipes: tuple[str, ...] = ("w8a8-smoothquant", "w4a16-smoothquant+-gptq")
    calib_samples: int = 16
    calib_len: int = 512


def _step(i: int, n: int, text: str) -> None:
    print(f"\n[{i}/{n}] {text}", flush=True)


def run_demo(opts: DemoOptions) -> dict:
    import qcompile
    from qcompile.pipeline.contract import PassContext
    from qcompile.pipeline.manager import run_recipe
    from qcompile.tools.eval import perplexity
    from qcompile.tools.models import load_smollm2

    n = 5
    _step(1, n, "load SmolLM2-135M-Instruct (packaged wheel, GGUF → fp32)")
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    print(f"  loaded in {time.perf_counter() - t0:.1f} s")

    _step(2, n, "capture with torch.export and run recipe 'fp' (structural analysis)")
    t0 = time.perf_counter()
    # Two rows, so export keeps the batch dimension symbolic (it specialises dimensions of size 1).
    ids = tok(["The quick brown fox jumps over the lazy dog."] * 2, return_tensors="pt").input_ids
    qgraph = qcompile.capture(model, (ids,))
    pipeline = run_recipe(qgraph, "fp", PassContext(sample_inputs=[(ids,)]))
    print(f"  captured and analysed in {time.perf_counter() - t0:.1f} s")
    print(pipeline.result("analyze").summary)

    _step(3, n, "captured graph vs eager (fp32 logits)")
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = pipeline.qgraph(ids).logits
    diff = (ref - out).abs().max().item()
    print(f"  max |logits_eager - logits_qgraph| = {diff:.2e}  (limit 1e-4)")

    _step(4, n, f"perplexity on wiki.test.raw (seq {opts.seq_len} × {opts.windows} windows)")
    res = perplexity(
        pipeline.qgraph, tok, seq_len=opts.seq_len, max_windows=opts.windows, progress=opts.progress
    )
    print(
        f"  FP32 perplexity (QGraph): {res.ppl:.3f}  over {res.n_tokens} predicted tokens in {res.seconds:.1f} s"
    )

    _step(
        5,
        n,
        f"quantized recipes (calibration {opts.calib_samples} × {opts.calib_len} tokens of wiki.valid.tokens)",
    )
    rows = [("fp", res.ppl, 0.0, res.seconds)]
    rows += _quantized_rows(qgraph, tok, opts)
    print(_table(rows, opts))
    return {"max_abs_diff": diff, "ppl": res.ppl, "table": rows}


def _quantized_rows(qgraph, tok, opts: DemoOptions) -> list[tuple[str, float, float, float]]:
    import qcompile
    from qcompile.tools.data import calibration_windows
    from qcompile.tools.eval import perplexity

    batches = [(w,) for w in calibration_windows(tok, opts.calib_samples, opts.calib_len, seed=0)]
    rows = []
    for name in opts.recipes:
        t0 = time.perf_counter()
        qm = qcompile.quantize(qgraph, name, calibration=batches, progress=opts.progress)
        t_quant = time.perf_counter() - t0
        print(f"  {name}: quantized in {t_quant:.1f} s")
        res = perplexity(
            qm.qgraph, tok, seq_len=opts.seq_len, max_windows=opts.windows, progress=opts.progress
        )
        rows.append((name, res.ppl, t_quant, res.seconds))
    return rows


def _table(rows: list[tuple[str, float, float, float]], opts: DemoOptions) -> str:
    fp = rows[0][1]
    lines = [
        f"\n  SmolLM2-135M, wiki.test.raw seq {opts.seq_len} × {opts.windows} windows",
        "  | recipe | ppl | vs fp | quantize (s) | eval (s) |",
        "  |---|---|---|---|---|",
    ]
    for name, ppl, tq, te in rows:
        rel = "—" if name == "fp" else f"{100 * (ppl / fp - 1):+.1f} %"
        lines.append(f"  | {name} | {ppl:.3f} | {rel} | {tq:.1f} | {te:.1f} |")
    return "\n".join(lines)
