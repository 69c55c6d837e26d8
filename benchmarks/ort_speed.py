"""ONNX Runtime speed and size of SmolLM2-135M exports: FP32 vs each quantized recipe.

    python benchmarks/ort_speed.py                              # the default rows, 2 threads
    python benchmarks/ort_speed.py --rows fp w4a16 --threads 2 --ppl-windows 0

Every file is the decode step with its KV cache (``qcompile export-onnx``), with target ``onnx``'s
ONNX Runtime rewrites (the ``onnx.*`` equivalence passes; the ``*-plain`` rows disable them, as
``--disable-pass 'onnx.*'`` does): prefill = one call
on a 512-token prompt with an empty cache (batch 1); decode = one token per call at a 512-token
context (the cache is random: speed does not depend on its values), batch 1 and 8, tokens/s =
batch × steps / seconds. Files with a shared KV buffer run in place on a fixed-size cache
(``OrtDecoder.step_inplace``, what ``generate`` does); plain files run the functional step. ORT CPU EP, ``intra_op_num_threads`` = ``--threads``. Median of ``--repeats``,
the files timed interleaved (each repeat runs every file once) so that load changes on a shared
machine hit every row alike, with a 50 ms pause before each timed workload: ORT's idle worker
threads spin-wait after a run, and without the pause the previous file's threads take cores from
the next file's first steps, which a single-session deployment never sees.

Accuracy: perplexity of the *reference* QGraph (torch) for each recipe on wiki.test.raw
(``--ppl-windows`` × ``--ppl-seq-len``). The ONNX file reproduces the reference up to its kernels'
own error — MatMulInteger's float epilogue and MatMulNBits' accuracy level (1: fp32 activations,
exact to ~1e-4; 4: activations quantized to int8 per block inside the kernel) — reported as
``ort Δ``, the relative L2 error of ORT's last-token logits vs the reference on 4 × 128 tokens.
The peer row is ORT's own ``MatMulNBitsQuantizer`` (4-bit, block 128, asymmetric) run on our FP32
export: it quantizes the MatMuls it finds and leaves the tied 49152 × 576 table in FP32.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from qcompile.backends.onnx import OrtDecoder, SessionOptions, set_accuracy_level  # noqa: E402
from qcompile.frontend.decoder import capture_decoder  # noqa: E402
from qcompile.ir import keys  # noqa: E402
from qcompile.pipeline.instruments import DisablePasses  # noqa: E402
from qcompile.tools.eval import perplexity  # noqa: E402
from qcompile.tools.export import export_decoder, load_causal_lm, quantize_decoder  # noqa: E402

PLAIN = ("onnx.*",)  # what the *-plain rows disable: every ONNX rewrite (the plain export)


@dataclass(frozen=True)
class Head:
    """lm_head and the tied embedding quantized to ``bits`` in symmetric groups of ``group``
    (``Recipe.with_quantization``, what ``export-onnx --lm-head-bits --embedding-bits`` does)."""

    bits: int
    group: int


@dataclass(frozen=True)
class Row:
    """One benchmarked file: a recipe, optional lm_head/embedding quantization, accuracy level."""

    name: str
    recipe: str | None  # None: the peer (ORT's quantizer on the FP32 file)
    head: Head | None = None
    accuracy_level: int = 4
    disabled: tuple[str, ...] = ()  # passes (or equivalence-pass patterns) the export does not run


def _headed(
    recipe: str, bits: int, group: int, disabled: tuple[str, ...] = (), label: str | None = None
) -> Row:
    """A W4A16 row whose lm_head and (tied) embedding are quantized to ``bits`` in ``group``s."""
    name = f"{label or recipe} g128 + lm_head/emb int{bits} g{group} (tied), acc 4"
    head = Head(bits, group)
    return Row(name + ("" if not disabled else ", no ORT rewrites"), recipe, head, disabled=disabled)


SQG = "w4a16-smoothquant+-gptq"
ROWS = {
    "fp": Row("fp32", "fp"),
    "w8a8": Row("w8a8-rtn (MatMulInteger)", "w8a8-rtn"),
    "w4a16": Row("w4a16-rtn g128, acc 4", "w4a16-rtn"),
    "w4a16-acc1": Row("w4a16-rtn g128, acc 1", "w4a16-rtn", accuracy_level=1),
    "w4a16-head": _headed("w4a16-rtn", 4, 64),
    "w4a16-head8": _headed("w4a16-rtn", 8, 64),
    "w4a16-gptq-head8": _headed("w4a16-gptq", 8, 64, label="w4a16-gptq (asym, clip)"),
    "w4a16-sqg-head8": _headed(SQG, 8, 64),
    "w4a16-sqg-kv8-head8": _headed(SQG + "-kv8", 8, 64),
    "w4a16-head8-g128": _headed("w4a16-rtn", 8, 128),
    "w4a16-sqg-head8-g128": _headed(SQG, 8, 128),
    "peer": Row("peer: ORT MatMulNBitsQuantizer b128 asym, acc 4", None),
    "fp-plain": Row("fp32, no ORT rewrites", "fp", disabled=PLAIN),
    "w4a16-sqg-head8-plain": _headed(SQG, 8, 64, disabled=PLAIN),
}
DEFAULT_ROWS = ["fp", "w8a8", "w4a16", "w4a16-acc1", "w4a16-head", "w4a16-head8", "peer"]
WORKLOADS = ("prefill", "b1", "b8")  # what a repeat times (``--workloads``)
SETTLE_S = 0.05  # idle pause before each timed workload (see _Timer.run_once)
CALIBRATION = (32, 512)  # windows x tokens of wiki.valid.tokens for recipes that calibrate (seed 0)
_calibration_cache: dict = {}
_references: dict = {}  # (recipe, head) -> the decode-step QGraph an export came from


def row_recipe(row: Row):
    """The recipe a row runs: its shipped recipe, with the head's annotations when it has one."""
    from qcompile.pipeline.recipe import load_recipe

    recipe = load_recipe(row.recipe if row.recipe is not None else "fp")
    if row.head is None:
        return recipe
    bits, group = row.head.bits, row.head.group
    return recipe.with_quantization(lm_head_bits=bits, embedding_bits=bits, head_group_size=group)


def _calibration(recipe, tok) -> list[torch.Tensor] | None:
    """Calibration windows for ``recipe`` if it calibrates (the export CLI's default budget)."""
    from qcompile.pipeline.recipe import load_recipe
    from qcompile.tools.data import calibration_windows

    if not load_recipe(recipe).needs_calibration():
        return None
    if "windows" not in _calibration_cache:
        _calibration_cache["windows"] = calibration_windows(tok, *CALIBRATION)
    return _calibration_cache["windows"]


@dataclass
class Result:
    row: Row
    file_mib: float
    prefill_ms: float
    decode_b1: float
    decode_b8: float
    ppl: float | None = None
    ort_delta: float | None = None


def _with_head_group(row: Row, group: int) -> Row:
    """``row`` with its head quantized in groups of ``group`` (``--head-group-size``)."""
    if row.head is None:
        return row
    return _headed(row.recipe, row.head.bits, group, row.disabled)


class _Timer:
    """One file's timed workloads: prefill (batch 1, 512 tokens) and a decode burst at batch 1 and 8.

    Files with a shared KV buffer (``past_sequence_length`` input) run as :meth:`OrtDecoder.generate`
    runs them: in place on a :class:`KVCache` (rewound to the 512-token context before each step);
    other files run the functional step (present = past ++ new, a fresh cache every call)."""

    def __init__(self, path: Path, threads: int, steps: int, vocab: int, ctx: int = 512) -> None:
        self.dec = OrtDecoder(path, SessionOptions(threads=threads))
        gen = np.random.default_rng(0)
        self.prompt = gen.integers(0, vocab, (1, ctx), dtype=np.int64)
        self.steps, self.ctx = steps, ctx
        self.past, self.cache = {}, {}
        for batch in (1, 8):
            shape = (batch, self.dec.num_kv_heads, ctx, self.dec.head_dim)
            self.past[batch] = [
                _random_cache(gen, shape, self.dec.dtype) for _ in range(2 * self.dec.num_layers)
            ]
            if self.dec.shared_buffer:
                self.cache[batch] = self.dec.new_cache(batch, ctx + 1)
                self.cache[batch].fill(self.past[batch])
        self.times: dict[str, list[float]] = {"prefill": [], "b1": [], "b8": []}

    def _prefill(self) -> None:
        if self.dec.shared_buffer:
            self.dec.step_inplace(self.prompt, self.dec.new_cache(1, self.ctx + 1))
        else:
            self.dec.step(self.prompt, self.dec.empty_cache(1))

    def _decode(self, batch: int) -> None:
        token = np.zeros((batch, 1), dtype=np.int64)
        for _ in range(self.steps):  # the same 512-token context every step
            if self.dec.shared_buffer:
                self.cache[batch].length = self.ctx
                self.dec.step_inplace(token, self.cache[batch])
            else:
                self.dec.step(token, self.past[batch])

    def run_once(self, record: bool = True, workloads: tuple[str, ...] = WORKLOADS) -> None:
        for key, fn in (
            ("prefill", self._prefill),
            ("b1", lambda: self._decode(1)),
            ("b8", lambda: self._decode(8)),
        ):
            if key not in workloads:
                continue
            # Let the previous session's intra-op threads stop spinning (ORT's workers spin-wait after
            # a run before they sleep): with files interleaved they would otherwise take cores from
            # the first steps timed here, which no single-session deployment sees.
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            if record:
                self.times[key].append(time.perf_counter() - t0)

    def result(self) -> tuple[float, float, float]:
        """(prefill ms, decode tokens/s at batch 1, at batch 8), medians (NaN for a workload not run)."""
        med = {k: statistics.median(v) if v else float("nan") for k, v in self.times.items()}
        return 1000 * med["prefill"], self.steps / med["b1"], 8 * self.steps / med["b8"]


def _random_cache(gen: np.random.Generator, shape: tuple, dtype: type) -> np.ndarray:
    """A cache of ``shape`` in the file's cache type (int8 for a quantized cache)."""
    if np.issubdtype(dtype, np.integer):
        return gen.integers(-128, 128, shape, dtype=dtype)
    return gen.standard_normal(shape, dtype=np.float32).astype(dtype)


def measure_all(
    paths: dict, threads: int, repeats: int, steps: int, vocab: int, workloads: tuple[str, ...] = WORKLOADS
) -> dict:
    """Time every file, interleaved: each repeat runs every file once, so a change of machine load
    (this is a shared machine) hits all rows alike instead of whichever row ran at the time."""
    timers = {row: _Timer(path, threads, steps, vocab) for row, path in paths.items()}
    for timer in timers.values():
        timer.run_once(record=False, workloads=workloads)  # warm-up: ORT's first-run allocations
    for _ in range(repeats):
        for timer in timers.values():
            timer.run_once(workloads=workloads)
    return {row: timer.result() for row, timer in timers.items()}


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """``MatMul(x, Transpose(W))`` → ``MatMul(x, Wᵀ)`` with Wᵀ an initializer, for weights read only by
    that Transpose (ORT's quantizer quantizes constant MatMul inputs only; torch.onnx leaves the
    transpose of ``linear``). A shared table (the tied embedding) is left alone, as in docs/methods.md."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    folded, keep = 0, []
    for node in model.graph.node:
        src = node.input[0] if node.input else ""
        if node.op_type == "Transpose" and src in inits and readers.get(src) == 1:
            arr = numpy_helper.to_array(inits[src]).T.copy()
            model.graph.initializer.remove(inits.pop(src))
            model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
            folded += 1
            continue
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return folded


def peer_quantize(fp_path: Path, out: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp_path))
    fold_weight_transposes(model)
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=128, is_symmetric=False, accuracy_level=4)
    quant.process()
    quant.model.save_model_to_file(str(out), use_external_data_format=False)


def reference_ppl(prefill_graph, row: Row, tok, windows: int, seq_len: int) -> float:
    ids = prefill_graph[1]
    recipe = row_recipe(row)
    cal = _calibration(recipe, tok)
    batches = [(w,) for w in cal] if cal is not None else None
    qm = qcompile.quantize(
        prefill_graph[0], recipe, calibration=batches, example_inputs=(ids,), progress=False
    )
    return perplexity(qm.qgraph, tok, seq_len=seq_len, max_windows=windows, progress=False).ppl


def _ort_deviation(path: Path, decoder, row: Row, tok, threads: int, n: int = 4, length: int = 128) -> float:
    """Relative L2 error of ORT's last-token logits vs the reference decode QGraph (the recipe run on
    the captured decoder, in torch), over ``n`` prompts of ``length`` tokens from wiki.test.raw."""
    from qcompile.tools.data import load_wikitext_test, tokenize

    reference = _references.get((row.recipe, row.head))
    if reference is None:  # --reuse: the file was not exported by this run
        recipe = row_recipe(row)
        reference = quantize_decoder(decoder, recipe, _calibration(recipe, tok))
    ids = tokenize(tok, load_wikitext_test())[0][: n * length].view(n, length)
    dec = OrtDecoder(path, SessionOptions(threads=threads))
    ort_logits, _ = dec.step(ids.numpy(), dec.empty_cache(n))
    ref, _ = reference(ids, decoder.info[keys.INFO_DECODER].empty(n))
    ref = ref.numpy()
    return float(np.linalg.norm(ort_logits - ref) / np.linalg.norm(ref))


def build_files(rows: list[Row], model, tok, decoder, work: Path, reuse: bool) -> dict[Row, Path]:
    """Export every row's file once (rows differing only in accuracy level share an export);
    ``reuse`` keeps files already in ``work``."""
    exports: dict[tuple, Path] = {}
    files: dict[Row, Path] = {}
    for row in rows:
        recipe = row.recipe if row.recipe is not None else "fp"
        key = (recipe, row.head, row.disabled)
        if key not in exports:
            head = f"-head{row.head.bits}g{row.head.group}" if row.head else ""
            stem = f"{recipe}{head}{'-plain' if row.disabled else ''}"
            path = work / f"{stem}.onnx"
            if not (reuse and path.exists()):
                t0 = time.perf_counter()
                full = row_recipe(row)
                exp = export_decoder(
                    model,
                    path,
                    recipe=full,
                    qgraph=decoder,
                    calibration=_calibration(full, tok),
                    instruments=[DisablePasses(row.disabled)] if row.disabled else [],
                )
                _references[key[:2]] = exp.qgraph  # quantized (and head-quantized), unfused: the reference
                print(
                    f"exported {path.name} in {time.perf_counter() - t0:.0f} s\n{exp.report.summary()}",
                    flush=True,
                )
            exports[key] = path
        path = exports[key]
        if row.recipe is None:
            files[row] = work / "peer.onnx"
            if not (reuse and files[row].exists()):
                peer_quantize(path, files[row])
        elif row.accuracy_level != 4:
            files[row] = work / f"{path.stem}-acc{row.accuracy_level}.onnx"
            set_accuracy_level(path, files[row], row.accuracy_level)
        else:
            files[row] = path
    return files


def format_table(results: list[Result], args: argparse.Namespace, argv: list[str]) -> str:
    fp = next((r for r in results if r.row.recipe == "fp"), None)
    cmd = "python benchmarks/ort_speed.py " + " ".join(shlex.quote(a) for a in argv)
    load = os.getloadavg()[0]
    lines = [
        f"{args.model} decode-step ONNX files; ORT {__import__('onnxruntime').__version__} CPU EP, "
        f"{args.threads} intra-op threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible, load average {load:.1f} at the end (shared machine: timings are noisy).",
        f"Prefill: 512 tokens, batch 1. Decode: one token per call at a 512-token context, median of "
        f"{args.repeats} × {args.steps} steps, files timed interleaved. ppl: reference QGraph (torch), wiki.test.raw "
        f"{args.ppl_windows} × {args.ppl_seq_len}. ort Δ: rel. L2 error of ORT's last-token logits vs the "
        "reference (4 prompts × 128 tokens).",
        "",
        "| file | MiB | × fp32 | prefill 512 (ms) | decode b1 (tok/s) | × fp32 | decode b8 (tok/s) | × fp32 | ppl | ort Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        size = f"{r.file_mib / fp.file_mib:.2f}" if fp else "-"
        b1 = f"{r.decode_b1 / fp.decode_b1:.2f}" if fp else "-"
        b8 = f"{r.decode_b8 / fp.decode_b8:.2f}" if fp else "-"
        ppl = f"{r.ppl:.2f}" if r.ppl is not None else "-"
        delta = f"{r.ort_delta:.1e}" if r.ort_delta is not None else "-"
        lines.append(
            f"| {r.row.name} | {r.file_mib:.1f} | {size} | {r.prefill_ms:.0f} | {r.decode_b1:.1f} | {b1} "
            f"| {r.decode_b8:.1f} | {b8} | {ppl} | {delta} |"
        )
    lines += ["", f"command: `{cmd.strip()}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, or tiny-llama for a smoke run")
    parser.add_argument("--rows", nargs="*", default=DEFAULT_ROWS, choices=list(ROWS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--head-group-size",
        type=int,
        default=None,
        help="lm_head/embedding group size for every row (default: the row's)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="decode calls per timed repeat")
    parser.add_argument(
        "--workloads",
        nargs="*",
        default=list(WORKLOADS),
        choices=WORKLOADS,
        help="what to time (e.g. only b1, for more repeats of the batch-1 decode in the same time)",
    )
    parser.add_argument("--ppl-windows", type=int, default=4, help="0 skips perplexity")
    parser.add_argument("--ppl-seq-len", type=int, default=512)
    parser.add_argument("--work", default="/tmp/qcompile_ort_bench", help="where the .onnx files go")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--reuse", action="store_true", help="keep .onnx files already in --work")
    parser.add_argument(
        "--no-ort-delta",
        action="store_true",
        help="skip the ort Δ column (with --reuse it re-runs each recipe to get the reference)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [ROWS[k] for k in args.rows]
    if args.head_group_size is not None:
        rows = [_with_head_group(r, args.head_group_size) for r in rows]
    if any(r.recipe is None for r in rows) and ROWS["fp"] not in rows:
        rows.insert(0, ROWS["fp"])  # the peer quantizes the FP32 export
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_causal_lm(args.model)
    decoder = capture_decoder(model)
    files = build_files(rows, model, tok, decoder, work, args.reuse)
    print("TIMING: every file exported; timing starts now", flush=True)
    timings = measure_all(
        files, args.threads, args.repeats, args.steps, model.config.vocab_size, tuple(args.workloads)
    )
    prefill_graph = None
    if args.ppl_windows:
        ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"].repeat(
            2, 1
        )
        prefill_graph = (qcompile.capture(model, (ids,)), ids)
    results = []
    for row in rows:
        res = Result(row, files[row].stat().st_size / 2**20, *timings[row])
        if prefill_graph is not None and row.recipe is not None:
            res.ppl = reference_ppl(prefill_graph, row, tok, args.ppl_windows, args.ppl_seq_len)
        if row.recipe not in (None, "fp") and not args.no_ort_delta:
            res.ort_delta = _ort_deviation(files[row], decoder, row, tok, args.threads)
        results.append(res)
        print(f"{row.name}: {res}", flush=True)
    table = format_table(results, args, argv)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
