"""Command line: ``qcompile demo | analyze | export-onnx | recipes``."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from qcompile.tools.demo import DemoOptions, run_demo

    run_demo(DemoOptions(seq_len=args.seq_len, windows=args.windows, progress=not args.no_progress))
    return 0


def _load(model_name: str):
    from qcompile.tools import models

    if model_name == "smollm2":
        model, tok = models.load_smollm2()
        text = "The quick brown fox jumps over the lazy dog."
        return model, (tok([text] * 2, return_tensors="pt").input_ids,)
    if model_name == "minilm":
        model, tok = models.load_minilm()
        return model, (tok(["a sentence to embed"] * 2, return_tensors="pt").input_ids,)
    if model_name == "tiny-llama":
        import torch

        return models.tiny_llama(), (torch.randint(0, 256, (2, 16)),)
    reason = models.local_model_error(model_name)
    if reason is not None:
        raise SystemExit(
            f"qcompile: unknown model {model_name!r}: not smollm2, minilm or tiny-llama, and not a local "
            f"model folder or .gguf file ({reason})"
        )
    import torch

    model, _ = models.load_local(model_name)
    vocab = int(getattr(model.config, "vocab_size", 256))
    return model, (torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),)


def _cmd_analyze(args: argparse.Namespace) -> int:
    import qcompile
    from qcompile.analysis.analyzer import analyze
    from qcompile.analysis.summary import format_structure

    model, example = _load(args.model)
    qgraph = qcompile.capture(model, example)
    print(format_structure(analyze(qgraph), qgraph, max_layers=args.layers))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from qcompile.pipeline.recipe import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:<24} {' → '.join(r.pass_names())}\n{'':<24} {r.description}")
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from qcompile.errors import PassError
    from qcompile.tools.export import ExportCommand, plan_export, run_export

    cmd = ExportCommand(
        model=args.model,
        recipe=args.recipe,
        out=args.out,
        accuracy_level=args.accuracy_level,
        int4_format=args.int4_format,
        lm_head_bits=args.lm_head_bits,
        embedding_bits=args.embedding_bits,
        head_group_size=args.head_group_size,
        kv_cache_bits=args.kv_cache_bits,
        prefill_only=args.prefill_only,
        calib=args.calib,
        disable=list(args.disable_pass),
        dump_dir=args.dump_dir,
        timing=args.timing,
    )
    try:  # every user choice is checked before the model loads; a mistake is one line, not a traceback
        plan_export(cmd)
    except (ValueError, PassError) as exc:  # RecipeError, TargetError, ExportError; a pass's options
        print("qcompile export-onnx: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    export = run_export(cmd)
    print(export.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qcompile.tools.export import DEFAULT_HEAD_BITS, DEFAULT_RECIPE

    parser = argparse.ArgumentParser(prog="qcompile", description="A quantization compiler for PyTorch LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SmolLM2: capture, structural summary, FP32 perplexity")
    demo.add_argument("--seq-len", type=int, default=1024)
    demo.add_argument("--windows", type=int, default=8)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    an = sub.add_parser("analyze", help="print the structural summary of a model")
    an.add_argument(
        "model",
        nargs="?",
        default="smollm2",
        help="smollm2 (default), minilm, tiny-llama, or a local HF folder / .gguf file",
    )
    an.add_argument("--layers", type=int, default=2, help="layers to list in detail")
    an.set_defaults(func=_cmd_analyze)
    ex = sub.add_parser("export-onnx", help="quantize a model and export it to ONNX (ONNX Runtime)")
    ex.add_argument(
        "model",
        nargs="?",
        default="smollm2",
        help="smollm2 (default), tiny-llama, or a local HF folder / .gguf file",
    )
    ex.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        help=f"a shipped recipe name or a TOML path (default {DEFAULT_RECIPE}: the recommended file)",
    )
    ex.add_argument("--out", default="model.onnx", help="the .onnx file to write")
    ex.add_argument(
        "--accuracy-level",
        type=int,
        default=4,
        choices=[0, 1, 2, 3, 4],
        help="MatMulNBits accuracy level: 4 = int8 activations in-kernel (fast), 1 = fp32",
    )
    ex.add_argument(
        "--int4-format",
        choices=["matmulnbits", "qdq"],
        default="matmulnbits",
        help="int4 weights as ORT MatMulNBits, or standard DequantizeLinear(INT4)+MatMul (ORT fuses it)",
    )
    ex.add_argument(
        "--lm-head-bits",
        type=int,
        choices=[0, 4, 8],
        default=None,
        help=f"quantize lm_head (weight-only RTN, symmetric groups); default {DEFAULT_HEAD_BITS} when the "
        "recipe quantizes, 0 keeps it float",
    )
    ex.add_argument(
        "--embedding-bits",
        type=int,
        choices=[0, 4, 8],
        default=None,
        help=f"quantize the embedding table (stored once with a tied lm_head on the same grid); default "
        f"{DEFAULT_HEAD_BITS} when the recipe quantizes, 0 keeps it float",
    )
    ex.add_argument("--head-group-size", type=int, default=64, help="group size for lm_head/embedding")
    ex.add_argument(
        "--kv-cache-bits",
        type=int,
        choices=[8],
        default=None,
        help="int8 KV cache: the recipe's annotate pass gets kv_cache_bits (static per-channel scales "
        "from calibration; GroupQueryAttention stores the cache in int8)",
    )
    ex.add_argument(
        "--prefill-only",
        action="store_true",
        help="export the plain forward (all-position logits, no KV cache)",
    )
    ex.add_argument("--calib", default="32x512", help="calibration windows NxL (recipes that calibrate)")
    ex.add_argument(
        "--disable-pass",
        action="append",
        default=[],
        metavar="NAME",
        help="do not run this pass (repeatable), e.g. onnx.fuse_rotary; a pattern such as 'onnx.*' "
        "matches the ONNX rewrites (equivalence passes) only, which gives the plain export; "
        "'fuse_attention' keeps attention decomposed (then also disable onnx.share_kv_buffer)",
    )
    ex.add_argument(
        "--dump-dir",
        default=None,
        metavar="DIR",
        help="write the IR before and after every pass (recipe and lowering) into DIR, numbered "
        "(as QCOMPILE_DUMP_DIR)",
    )
    ex.add_argument(
        "--timing", action="store_true", help="print the time of every pass (as QCOMPILE_TIMING=1)"
    )
    ex.set_defaults(func=_cmd_export_onnx)
    rc = sub.add_parser("recipes", help="list the shipped recipes")
    rc.set_defaults(func=_cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
