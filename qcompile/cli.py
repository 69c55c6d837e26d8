"""Command line: ``qcompile demo | analyze | recipes``."""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from qcompile.demo import DemoOptions, run_demo

    run_demo(DemoOptions(seq_len=args.seq_len, windows=args.windows, progress=not args.no_progress))
    return 0


def _load(model_name: str):
    from qcompile import models

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
    raise SystemExit(f"qcompile: unknown model {model_name!r}; choose smollm2, minilm or tiny-llama")


def _cmd_analyze(args: argparse.Namespace) -> int:
    import qcompile
    from qcompile.analysis import analyze
    from qcompile.summary import format_structure

    model, example = _load(args.model)
    qgraph = qcompile.capture(model, example)
    print(format_structure(analyze(qgraph), qgraph, max_layers=args.layers))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from qcompile.recipe import list_recipes, load_recipe

    for name in list_recipes():
        r = load_recipe(name)
        print(f"{name:<24} {' → '.join(r.pass_names())}\n{'':<24} {r.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompile", description="A quantization compiler for PyTorch LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SmolLM2: capture, structural summary, FP32 perplexity")
    demo.add_argument("--seq-len", type=int, default=1024)
    demo.add_argument("--windows", type=int, default=8)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    an = sub.add_parser("analyze", help="print the structural summary of a model")
    an.add_argument("model", nargs="?", default="smollm2", help="smollm2 (default), minilm, tiny-llama")
    an.add_argument("--layers", type=int, default=2, help="layers to list in detail")
    an.set_defaults(func=_cmd_analyze)
    rc = sub.add_parser("recipes", help="list the shipped recipes")
    rc.set_defaults(func=_cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
