"""The compile front door lowers: CPU kernels (torch's packed int4 / int8 GEMMs), Inductor, one recipe
run per model, calibration through options, generate, and option errors that name the option.

Tolerances: the CPU kernels take bfloat16 activations and scales (8 significant bits: each rounding
is at most 2^-9 ≈ 2e-3 relative), so one kernel call is compared with its reference at a relative L2
error of 1e-2, and a whole tiny Llama (14 quantized linears, measured ~2.5e-3) at 2e-2. With integer
activations the kernel reads the exact integers, so only the weight scales and the output round.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import qcompile.frontend.compile_backend as cb
from qcompile.backends import cpu
from qcompile.ops import QLINEAR_W, QLINEAR_WA
from qcompile.ops.registry import implementation
from qcompile.passes.fold_qdq import pack_weight
from qcompile.pipeline.instruments import Instrument
from qcompile.tools.models import tiny_llama
from tests.test_capture import token_ids

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    cb.clear_compiled()
    cb.clear_cache()
    yield
    torch._dynamo.reset()
    cb.clear_cache()


class PassCounter(Instrument):
    """Counts every pass the pass manager runs (recipe and lowering passes alike)."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def before_pass(self, pass_, ir, ctx) -> None:  # noqa: ANN001
        self.ran.append(pass_.name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _weight(n: int, k: int, group: int, bits: int, symmetric: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lo = -(2 ** (bits - 1))
    q = torch.randint(lo, -lo, (n, k), generator=gen, dtype=torch.int8)
    groups = 1 if group == 0 else -(-k // group)
    scale = torch.rand(n, groups, generator=gen) / 10 + 0.01
    zp = torch.zeros(n, groups, dtype=torch.int8)
    if not symmetric:
        zp = torch.randint(-8, 8, (n, groups), generator=gen, dtype=torch.int8)
    return pack_weight(q, scale, zp, group, bits, weight_only=True)


@pytest.mark.parametrize(
    ("n", "k", "group", "bits", "symmetric"),
    [
        (96, 576, 128, 4, True),  # SmolLM2's ragged 576 = 4·128 + 64: kernel group 64, no padding
        (40, 96, 64, 4, False),  # asymmetric, N padded to 48, ragged last group of 32
        (48, 40, 128, 4, True),  # one group wider than K = 40: K padded to 64 (kernel group 64)
        (32, 80, 0, 8, True),  # int8 per channel: aten._weight_int8pack_mm
    ],
)
def test_cpu_kernels_match_the_reference(n: int, k: int, group: int, bits: int, symmetric: bool) -> None:
    packed = _weight(n, k, group, bits, symmetric)
    gen = torch.Generator().manual_seed(1)
    common = {
        "w": packed.w, "w_scale": packed.scale, "w_zero_point": packed.zero_point,
        "bias": torch.randn(n, generator=gen), "w_bits": packed.bits, "in_features": k, "group_size": group,
    }  # fmt: skip
    args = {"x": torch.randn(2, 3, k, generator=gen), **common}
    impl = implementation("cpu", "qlinear_w")
    assert impl.supports(args, CPU) is None
    out = impl.op(**impl.prepare(args))
    assert rel_err(out, QLINEAR_W(*args.values())) < 1e-2
    xq = torch.randint(-127, 128, (2, 3, k), generator=gen, dtype=torch.int8)
    zp = None if symmetric else torch.randint(-4, 4, (2, 3, 1), generator=gen, dtype=torch.int8)
    args_wa = {"xq": xq, "x_scale": torch.rand(2, 3, 1, generator=gen) / 50, "x_zero_point": zp, **common}
    impl_wa = implementation("cpu", "qlinear_wa")
    assert impl_wa.supports(args_wa, CPU) is None
    assert rel_err(impl_wa.op(**impl_wa.prepare(args_wa)), QLINEAR_WA(*args_wa.values())) < 1e-2


def test_cpu_kernels_say_why_they_refuse() -> None:
    packed = _weight(32, 64, 16, 4, True)  # group 16: no kernel group fits inside it
    args = {
        "x": torch.randn(1, 64), "w": packed.w, "w_scale": packed.scale, "w_zero_point": None, "bias": None,
        "w_bits": 4, "in_features": 64, "group_size": 16,
    }  # fmt: skip
    assert "group size 16" in implementation("cpu", "qlinear_w").supports(args, CPU)
    asym = _weight(32, 64, 0, 8, False)
    args8 = {
        **args,
        "w": asym.w,
        "w_scale": asym.scale,
        "w_zero_point": asym.zero_point,
        "w_bits": 8,
        "group_size": 0,
    }
    assert "asymmetric" in implementation("cpu", "qlinear_w").supports(args8, CPU)
    assert "device" in implementation("cpu", "qlinear_w").supports(args, torch.device("meta"))
    assert cpu.kernel_group(128, 576) == (64, 576) and cpu.kernel_group(128, 40) == (64, 64)


def test_compile_lowers_to_cpu_kernels_and_inductor_once_per_model(tiny_model) -> None:
    """W4A16 through the front door: every linear on the int4 kernel, Inductor-compiled, close to
    the reference lowering; a second torch.compile of the same model and recipe runs no pass."""
    counter = PassCounter()
    opts = {"recipe": "w4a16-rtn", "instruments": [counter]}
    compiled = torch.compile(tiny_model, backend="qcompile", options=opts, dynamic=True)
    reference = torch.compile(
        tiny_model, backend="qcompile", options={"recipe": "w4a16-rtn", "lowering": "reference"}, dynamic=True
    )
    with torch.no_grad():
        for batch, seq in [(2, 8), (3, 5)]:
            ids = token_ids(batch, seq, seed=seq)
            assert rel_err(compiled(ids).logits, reference(ids).logits) < 2e-2
    entries = [e for e in cb.compiled_graphs() if e.inductor]
    assert len(entries) == 1, "dynamic=True: one graph serves both shapes"
    report = entries[0].lowering.result("lower_kernels").report
    assert report["backend"] == "cpu" and report["lowered"] == 14 and not report["kept"]
    assert {c["kernel"] for c in report["nodes"].values()} == {"cpu: qcompile_cpu.qlinear_w.default"}
    ran = list(counter.ran)
    assert ran.count("quantize") == 1 and ran.count("lower_kernels") == 1
    _check_kept_references(entries[0].qgraph)
    torch._dynamo.reset()
    again = torch.compile(tiny_model, backend="qcompile", options=opts, dynamic=True)
    with torch.no_grad():
        again(token_ids(4, 6))
    assert counter.ran == ran, "the cached quantized graph was recompiled"
    assert cb.last_compiled().cache_hit


def _check_kept_references(quantized) -> None:  # noqa: ANN001
    """``lower_kernels`` without a usable backend keeps every call on its reference and says why."""
    from qcompile.pipeline.contract import PassContext
    from qcompile.pipeline.manager import PassManager
    from qcompile.pipeline.recipe import PassSpec

    ids = token_ids(2, 8)
    expected = quantized(ids)[0]  # Dynamo's graph returns a flat tuple; the logits first
    for backend, reason in [("reference", "lowering backend 'reference'"), ("nope", "failed to import")]:
        passes = [PassSpec("fold_qdq").build(), PassSpec("lower_kernels", {"backend": backend}).build()]
        result = PassManager(passes, use_env=False).run(quantized, PassContext(show_progress=False))
        report = result.result("lower_kernels").report
        assert report["lowered"] == 0 and len(report["nodes"]) == 14
        assert all(reason in c["reason"] and c["kernel"] is None for c in report["nodes"].values())
        torch.testing.assert_close(result.qgraph(ids)[0], expected, rtol=0, atol=1e-5)


def test_calibrating_recipe_through_options(tiny_model) -> None:
    batches = [token_ids(1, 16, seed=s) for s in range(2)]
    options = {"recipe": "w8a8-smoothquant", "calibration": batches, "inductor": False}
    static = torch.compile(tiny_model, backend="qcompile", options=options)
    with pytest.raises(Exception, match=r"graph is static for \(2, 8\).*dynamic=True"):
        static(token_ids(2, 8))
    torch._dynamo.reset()
    # The tokenizer path, as qcompile.quantize(..., tokenizer=tok): WikiText-2 validation windows
    # (a byte tokenizer fits the tiny model's 256-token vocabulary; a small CalibrationConfig).
    from qcompile import CalibrationConfig
    from qcompile.tools.models import ByteTokenizer

    options = {
        "recipe": "w8a8-smoothquant", "tokenizer": ByteTokenizer(),
        "calibration": CalibrationConfig(n_samples=2, seq_len=16), "inductor": False,
    }  # fmt: skip
    compiled = torch.compile(tiny_model, backend="qcompile", options=options, dynamic=True)
    with torch.no_grad():
        ids = token_ids(2, 8)
        out = compiled(ids).logits
    entry = cb.last_compiled()
    assert entry.pipeline.result("smooth").changed  # SmoothQuant ran on the calibration statistics
    report = entry.lowering.result("lower_kernels").report
    assert report["lowered"] == 14  # W8A8: int8 per channel, symmetric -> aten._weight_int8pack_mm
    assert rel_err(out, tiny_model(ids).logits) < 0.1  # int8 activations and weights vs float


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"recipe": "w4a16-rtn", "lowering": "fast"}, r"options\['lowering'\] = 'fast'; valid: kernels"),
        ({"recipe": "w4a16-rtn", "inductor": "yes"}, r"options\['inductor'\] must be a bool"),
        ({"recipe": "w4a16-rtn", "calibration": "wiki"}, r"options\['calibration'\] must be a list"),
        ({"calibration": [torch.ones(1, 4, dtype=torch.long)]}, r"give options\['recipe'\]"),
        ({"recipe": "no-such-recipe"}, r"options\['recipe'\] = 'no-such-recipe'"),
        ({"recipe": "fp", "lowering": "reference", "inductor": True}, r"options\['inductor'\] = True needs"),
        (
            {"recipe": "w8a8-smoothquant"},
            r"calibrates: give options\['calibration'\].*options\['tokenizer'\]",
        ),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    model = torch.nn.Linear(4, 4)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="qcompile", options=options)
    with pytest.raises(Exception, match=message):
        compiled(torch.ones(2, 4))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_generate_on_a_compiled_quantized_model() -> None:
    """``model.generate`` through the front door with ``dynamic=True``: a prefill graph, then decode
    steps with a KV cache — Dynamo specialises the first step (one token) and the second reuses its
    symbolic product. The tiny model's greedy tokens do not move under int4 RTN (checked against
    the float model): a kernel computing garbage would change them."""
    ids = token_ids(1, 6)
    expected = tiny_llama(use_cache=True).eval().generate(ids, max_new_tokens=4, do_sample=False)
    model = tiny_llama(use_cache=True).eval()
    opts = {"recipe": "w4a16-rtn", "inductor": False}
    model.forward = torch.compile(model.forward, backend="qcompile", options=opts, dynamic=True)
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, 10) and torch.equal(tokens, expected)
    graphs = cb.compiled_graphs()
    assert {e.lowering.result("lower_kernels").report["lowered"] for e in graphs} == {14}
    assert sum(not e.cache_hit for e in graphs) == 2  # prefill and the decode step; the rest reused


def test_inductor_runner_takes_inputs_in_any_layout() -> None:
    """Inductor asserts the strides it compiled for; a KV cache changes layout between decode steps,
    so the runner is compiled for contiguous inputs and makes them so."""
    from qcompile import capture
    from qcompile.frontend.compile_lowering import inductor_runner

    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 + 1

    qgraph = capture(Scale(), (torch.randn(3, 4, 5),))
    run = inductor_runner(qgraph)
    x = torch.randn(3, 5, 4).transpose(1, 2)  # [3, 4, 5], not contiguous
    torch.testing.assert_close(run([x])[0], x * 2 + 1)
    assert run([torch.randn(2, 4, 7)])[0].shape == (2, 4, 7)  # symbolic sizes: one compile, any shape
