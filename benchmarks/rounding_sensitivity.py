"""How much does a recipe's torch perplexity move when the embedding table is nudged by a relative
2⁻²² (about one float32 ulp)? A yardstick for ORT-vs-torch perplexity gaps: where a recipe's
activation roundings are chaotic, any other summation order (another backend) moves it that much too.

    python benchmarks/rounding_sensitivity.py --recipes w8a8-rtn-static

Protocol as ``benchmarks/ppl.py`` (wiki.test.raw windows, calibration from wiki.valid.tokens, seed 0).
SmolLM2's embedding is tied to lm_head, so the nudge reaches both.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import qcompile  # noqa: E402
from qcompile.ir import keys
from qcompile.pipeline.recipe import load_recipe  # noqa: E402
from qcompile.tools.data import calibration_windows  # noqa: E402
from qcompile.tools.eval import paired_delta, perplexity  # noqa: E402
from qcompile.tools.models import load_smollm2  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["w8a8-rtn-static"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calib", default="32x512")
    parser.add_argument("--nudge", type=float, default=2.0**-22)
    args = parser.parse_args(argv)
    n_cal, len_cal = (int(v) for v in args.calib.lower().split("x"))
    model, tok = load_smollm2()
    example = (tok(["The quick brown fox jumps over the lazy dog."] * 2, return_tensors="pt").input_ids,)
    qgraph = qcompile.capture(model, example)
    batches = [(w,) for w in calibration_windows(tok, n_cal, len_cal, seed=0)]
    print(
        f"| recipe | ppl | embedding × (1 + {args.nudge:.3g}) | Δ (± 1 s.e. over windows) |\n|---|---|---|---|"
    )
    for name in args.recipes:
        cal = batches if load_recipe(name).needs_calibration() else None
        qm = qcompile.quantize(qgraph, name, calibration=cal, example_inputs=example, progress=False)
        base = perplexity(qm.qgraph, tok, seq_len=args.seq_len, max_windows=args.windows, progress=False)
        table = qm.qgraph.node(qm.qgraph.info[keys.INFO_STRUCTURE].embeddings[0].node).args[0]
        qm.qgraph.set_constant(table, qm.qgraph.get_constant(table) * (1 + args.nudge))
        moved = perplexity(qm.qgraph, tok, seq_len=args.seq_len, max_windows=args.windows, progress=False)
        print(f"| {name} | {base.ppl:.3f} | {moved.ppl:.3f} | {paired_delta(base, moved)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
