"""Perplexity of SmolLM2-135M under every recipe, with the time each recipe took.

    python benchmarks/ppl.py                         # all shipped recipes, seq 2048 x 16 windows
    python benchmarks/ppl.py --recipes fp w8a8-rtn --seq-len 1024 --windows 8 --calib 32x512

Protocol: wiki.test.raw (universal newlines), non-overlapping windows from the start; calibration
windows drawn (seeded) from wiki.valid.tokens only. Prints a Markdown table and the command line
that produced it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import qcompile  # noqa: E402
from qcompile.data import calibration_windows  # noqa: E402
from qcompile.eval import perplexity  # noqa: E402
from qcompile.models import load_smollm2  # noqa: E402
from qcompile.recipe import list_recipes, load_recipe  # noqa: E402


def _parse_calib(text: str) -> tuple[int, int]:
    n, _, length = text.lower().partition("x")
    return int(n), int(length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="*", default=None, help="default: every shipped recipe")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--calib", default="128x512", help="calibration windows NxL from wiki.valid.tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    recipes = args.recipes or list_recipes()
    n_cal, len_cal = _parse_calib(args.calib)

    model, tok = load_smollm2()
    example = (tok(["The quick brown fox jumps over the lazy dog."] * 2, return_tensors="pt").input_ids,)
    qgraph = qcompile.capture(model, example)
    batches = None
    rows = []
    for name in recipes:
        recipe = load_recipe(name)
        needs_cal = "calibrate" in recipe.pass_names()
        if needs_cal and batches is None:
            batches = [(w,) for w in calibration_windows(tok, n_cal, len_cal, seed=args.seed)]
        print(f"\n=== {name}: {' -> '.join(recipe.pass_names())}", flush=True)
        t0 = time.perf_counter()
        qm = qcompile.quantize(
            qgraph, recipe, calibration=batches if needs_cal else None, example_inputs=example
        )
        t_quant = time.perf_counter() - t0
        res = perplexity(qm.qgraph, tok, seq_len=args.seq_len, max_windows=args.windows)
        rows.append((name, res.ppl, t_quant, res.seconds))
        print(f"    ppl {res.ppl:.3f}  (quantize {t_quant:.1f} s, eval {res.seconds:.1f} s)", flush=True)

    fp = next((r[1] for r in rows if r[0] == "fp"), None)
    cmd = (
        "python benchmarks/"
        + os.path.basename(__file__)
        + " "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    )
    lines = [
        f"SmolLM2-135M-Instruct, wiki.test.raw seq {args.seq_len} x {args.windows} windows; "
        f"calibration {n_cal} x {len_cal} tokens of wiki.valid.tokens (seed {args.seed}); "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "",
        "| recipe | ppl | vs fp | quantize (s) | eval (s) |",
        "|---|---|---|---|---|",
    ]
    for name, ppl, tq, te in rows:
        rel = f"{100 * (ppl / fp - 1):+.1f} %" if fp and name != "fp" else "—"
        lines.append(f"| {name} | {ppl:.3f} | {rel} | {tq:.1f} | {te:.1f} |")
    lines += ["", f"command: `{cmd.strip()}`"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
