"""torch.compile speed of SmolLM2-135M on CPU: eager FP32, Inductor FP32 and ``backend="qcompile"``.

    python benchmarks/compile_speed.py                      # every row, 2 threads
    python benchmarks/compile_speed.py --rows eager inductor qc-w4a16 --rounds 5

Rows (each its own copy of the model, so no row's compiled code can serve another's):

- ``eager``: the transformers model, FP32;
- ``capture``: ``qcompile.capture`` (the QGraph run as an fx GraphModule, no compile);
- ``qc-fp-none``: ``backend="qcompile"``, recipe ``fp``, ``lowering="none"`` — the front door without
  lowering, i.e. what ``backend="qcompile"`` ran before the lowering existed (the "overhead" row);
- ``inductor``: ``torch.compile(model)``, FP32;
- ``qc-w4a16`` / ``qc-w8a8`` / ``qc-w4a4``: ``backend="qcompile"`` with recipe ``w4a16-rtn`` /
  ``w8a8-rtn`` / ``w4a4-rtn``, each with the lm_head at int8 per output channel
  (``Recipe.with_quantization(lm_head_bits=8, head_group_size=0)``) — lowered to the CPU kernels and
  compiled by Inductor.

Workloads (batch 1 unless said): prefill = one forward over 512 tokens (``use_cache=False``, the
perplexity call); decode = one token per call on a KV cache holding a 512-token context (random K/V:
speed does not depend on the values), at batch 1 and 8, tokens/s = batch × steps / seconds. Every
compiled row runs with ``dynamic=True`` (one graph for all sequence lengths; Dynamo still
specialises size 1, so prefill, decode at batch 1 and decode at batch 8 are three graphs).
``compile s`` is the first prefill call (capture, recipe, lowering, Inductor); ``new shape s`` the
first decode call at batch 8 after batch 1 (a new graph Dynamo asks for). Every workload runs once
before the timed rounds, and the script warns if Dynamo compiled anything during them.

Timing: rounds alternate the rows (each round runs every row once per workload), so load changes
on a shared machine hit every row alike; the median over rounds is printed with the 1-minute load
average at the start and end. Dynamo's recompile limit is per code object and shared by every
``torch.compile`` of the same class (``LlamaForCausalLM.forward``) across backends: with several
compiled rows it would be hit and Dynamo would silently run the model eagerly, so the script raises
it (``torch._dynamo.config.recompile_limit``) and checks every compiled row ran its compiled code.

Perplexity: WikiText-2 test, ``--ppl-windows`` × 512 tokens, through the same prefill call.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import qcompile  # noqa: E402
import qcompile.frontend.compile_backend as cb  # noqa: E402
from qcompile.pipeline.recipe import load_recipe  # noqa: E402
from qcompile.tools.data import load_wikitext_test, tokenize  # noqa: E402
from qcompile.tools.models import load_smollm2  # noqa: E402

ROWS = ("eager", "capture", "qc-fp-none", "inductor", "qc-w4a16", "qc-w8a8", "qc-w4a4")
RECIPES = {"qc-w4a16": "w4a16-rtn", "qc-w8a8": "w8a8-rtn", "qc-w4a4": "w4a4-rtn"}


@dataclass
class Row:
    name: str
    prefill: Callable[[torch.Tensor], torch.Tensor]  # ids [B, L] -> logits
    decode: Callable[[torch.Tensor, Any], torch.Tensor] | None  # (ids [B, 1], cache) -> logits
    compiled: bool = False
    times: dict[str, list[float]] = field(default_factory=dict)
    first_calls: dict[str, float] = field(default_factory=dict)
    ppl: float | None = None


def _hf_rows(model: torch.nn.Module, name: str, compile_fn: Callable | None) -> Row:
    m = copy.deepcopy(model).eval()
    fn = compile_fn(m) if compile_fn is not None else m

    def prefill(ids: torch.Tensor) -> torch.Tensor:
        return fn(input_ids=ids, use_cache=False).logits

    def decode(ids: torch.Tensor, cache: Any) -> torch.Tensor:
        return fn(input_ids=ids, past_key_values=cache, use_cache=True).logits

    return Row(name, prefill, decode, compiled=compile_fn is not None)


def build_rows(model: torch.nn.Module, names: list[str], example: torch.Tensor) -> list[Row]:
    rows = []
    head8 = {"lm_head_bits": 8, "head_group_size": 0}
    for name in names:
        if name == "eager":
            rows.append(_hf_rows(model, name, None))
        elif name == "capture":
            qgraph = qcompile.capture(model, (example,))
            rows.append(Row(name, lambda ids, q=qgraph: q(ids).logits, None))
        elif name == "qc-fp-none":
            opts = {"recipe": "fp", "lowering": "none"}
            rows.append(
                _hf_rows(model, name, lambda m, o=opts: torch.compile(m, backend="qcompile", options=o))
            )
        elif name == "inductor":
            rows.append(_hf_rows(model, name, lambda m: torch.compile(m, dynamic=True)))
        elif name in RECIPES:
            recipe = load_recipe(RECIPES[name]).with_quantization(**head8)
            opts = {"recipe": recipe}
            rows.append(
                _hf_rows(
                    model,
                    name,
                    lambda m, o=opts: torch.compile(m, backend="qcompile", options=o, dynamic=True),
                )
            )
        else:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
    return rows


def random_cache(config: Any, batch: int, past: int, seed: int = 0) -> Any:
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=config)
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        k = torch.randn(batch, heads, past, dim, generator=gen)
        v = torch.randn(batch, heads, past, dim, generator=gen)
        cache.update(k, v, layer)
    return cache


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_steps(row: Row, config: Any, batch: int, past: int, steps: int) -> float:
    """Seconds for ``steps`` one-token calls after a fresh random ``past``-token cache."""
    cache = random_cache(config, batch, past)
    ids = torch.full((batch, 1), 42, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = row.decode(ids, cache)
        ids = logits[:, -1:].argmax(-1)
    return time.perf_counter() - t0


def perplexity(row: Row, ids: torch.Tensor, seq: int, windows: int) -> float:
    nll, count = 0.0, 0
    for w in range(windows):
        chunk = ids[:, w * seq : (w + 1) * seq]
        logits = row.prefill(chunk)[0, :-1].double()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += seq - 1
    return float(torch.tensor(nll / count).exp())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per timed call")
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument(
        "--ppl-delta",
        action="store_true",
        help="only: perplexity of each recipe, reference ops vs CPU kernels",
    )
    args = parser.parse_args(argv)
    if args.ppl_delta:
        torch.set_num_threads(args.threads)
        ppl_deltas(args)
        return
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    load_start = os.getloadavg()

    model, tok = load_smollm2()
    model.eval()
    text_ids = tokenize(tok, load_wikitext_test())
    prompt = text_ids[:, : args.prefill]
    rows = build_rows(model, args.rows, prompt)
    config = model.config

    with torch.no_grad():
        for row in rows:  # first calls: compile, then the decode graphs (batch 1, then a new shape)
            row.first_calls["compile"] = timed(lambda r=row: r.prefill(prompt))
            if row.decode is not None:  # every timed workload once, so no round compiles anything
                row.first_calls["decode1"] = decode_steps(row, config, 1, args.past, args.steps)
                row.first_calls["new shape"] = decode_steps(row, config, 8, args.past, 1)
                decode_steps(row, config, 8, args.past, args.steps)
            print(f"# {row.name}: first calls {', '.join(f'{k} {v:.1f} s' for k, v in row.first_calls.items())}",
                  flush=True)  # fmt: skip
        frames = dict(torch._dynamo.utils.counters["frames"])
        for r in range(args.rounds):
            for row in rows:
                row.times.setdefault("prefill", []).append(timed(lambda r=row: r.prefill(prompt)))
                if row.decode is not None:
                    for batch in (1, 8):
                        secs = decode_steps(row, config, batch, args.past, args.steps)
                        row.times.setdefault(f"decode{batch}", []).append(batch * args.steps / secs)
            print(f"# round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
        if dict(torch._dynamo.utils.counters["frames"]) != frames:
            print("WARNING: Dynamo compiled frames during the timed rounds; timings include compiles",
                  file=sys.stderr)  # fmt: skip
        for row in rows:
            if args.ppl_windows:
                row.ppl = perplexity(row, text_ids, args.prefill, args.ppl_windows)
    check_compiled(rows)
    print_table(rows, args, load_start, os.getloadavg())


def ppl_deltas(args: argparse.Namespace) -> None:
    """What the CPU kernels change numerically: each recipe's perplexity with the ops' torch
    references (fold_qdq) and with ``lower_kernels`` (bf16 activations into the weight-only kernels,
    bf16 scales), on the same windows; no Dynamo, so the difference is the kernels' alone."""
    from qcompile.pipeline.contract import PassContext
    from qcompile.pipeline.manager import PassManager
    from qcompile.pipeline.recipe import PassSpec

    model, tok = load_smollm2()
    model.eval()
    ids = tokenize(tok, load_wikitext_test())
    print(f"command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`; load {os.getloadavg()[0]:.2f}")
    print(
        f"\n| recipe | ppl reference ops | ppl CPU kernels | Δ | ({args.ppl_windows}×{args.prefill} tokens) |"
    )
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name in [n for n in args.rows if n in RECIPES]:
            recipe = load_recipe(RECIPES[name]).with_quantization(lm_head_bits=8, head_group_size=0)
            quantized = qcompile.quantize(model, recipe, example_inputs=(ids[:, :16],), progress=False)
            results = {}
            for lowering in ("fold_qdq", "lower_kernels"):
                names = ["fold_qdq"] + (["lower_kernels"] if lowering == "lower_kernels" else [])
                pm = PassManager([PassSpec(n).build() for n in names])
                qgraph = pm.run(quantized.qgraph, PassContext(show_progress=False)).qgraph
                row = Row(lowering, lambda x, q=qgraph: q(x).logits, None)
                results[lowering] = perplexity(row, ids, args.prefill, args.ppl_windows)
            ref, ker = results["fold_qdq"], results["lower_kernels"]
            print(
                f"| {recipe.name} | {ref:.4f} | {ker:.4f} | {100 * (ker - ref) / ref:+.2f} % | |", flush=True
            )


def check_compiled(rows: list[Row]) -> None:
    """Every qcompile row's compiled graphs exist and were lowered (not an eager fallback)."""
    graphs = cb.compiled_graphs()
    for row in rows:
        if row.name.startswith("qc-") and row.name != "qc-fp-none":
            recipe = RECIPES[row.name]
            mine = [g for g in graphs if str(getattr(g.recipe, "name", g.recipe)).startswith(recipe)]
            if not mine:
                print(f"WARNING: no compiled graph recorded for {row.name}", file=sys.stderr)
            for g in mine:
                if g.lowering is not None:
                    print(f"# {row.name}: {g.lowering.result('lower_kernels').summary}")


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def print_table(rows: list[Row], args: argparse.Namespace, load_start: tuple, load_end: tuple) -> None:
    base = {
        k: _median(next((r.times.get(k) for r in rows if r.name == "inductor"), None))
        for k in ("prefill", "decode1", "decode8")
    }
    print()
    print(f"command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{args.threads} threads; load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/"
        f"{load_start[2]:.2f}, at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}"
    )
    print()
    print(
        f"| row | prefill {args.prefill} s | vs inductor | decode b1 tok/s | vs inductor | decode b8 tok/s | "
        f"vs inductor | compile s | new shape s | ppl ({args.ppl_windows}×{args.prefill}) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cell(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    def ratio(v: float | None, b: float | None, invert: bool) -> str:
        if v is None or b is None:
            return "—"
        return f"{(b / v if invert else v / b):.2f}×"

    for row in rows:
        p, d1, d8 = (_median(row.times.get(k)) for k in ("prefill", "decode1", "decode8"))
        print(
            f"| {row.name} | {cell(p, '.3f')} | {ratio(p, base['prefill'], True)} | {cell(d1, '.1f')} | "
            f"{ratio(d1, base['decode1'], False)} | {cell(d8, '.1f')} | {ratio(d8, base['decode8'], False)} | "
            f"{cell(row.first_calls.get('compile'), '.1f')} | {cell(row.first_calls.get('new shape'), '.1f')} | "
            f"{cell(row.ppl, '.3f')} |"
        )
    print(
        "\n'vs inductor': speed relative to torch.compile (Inductor) FP32, >1 is faster (prefill: time ratio inverted)."
    )


if __name__ == "__main__":
    main()
