"""Perplexity: the protocol checked against an independent computation, plus the real SmolLM2 number."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from qcompile.tools.eval import PerplexityResult, _logits, paired_delta, perplexity
from qcompile.tools.models import ByteTokenizer, tiny_llama

TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 540 bytes


def _reference_ppl(model: torch.nn.Module, text: str, seq_len: int, max_windows: int) -> float:
    """Written independently of qcompile.tools.eval: per-window mean CE, weighted by predicted tokens."""
    ids = torch.tensor(list(text.encode("utf-8")))
    n = min(len(ids) // seq_len, max_windows)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            chunk = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
            logits = model(input_ids=chunk).logits[0]
            loss = F.cross_entropy(logits[:-1].double(), chunk[0, 1:])
            nll_sum += loss.item() * (seq_len - 1)
            count += seq_len - 1
    return math.exp(nll_sum / count)


def test_perplexity_matches_hand_reference() -> None:
    model = tiny_llama()
    res = perplexity(model, ByteTokenizer(), text=TEXT, seq_len=64, max_windows=5, progress=False)
    assert isinstance(res, PerplexityResult)
    assert (res.n_windows, res.seq_len, res.n_tokens) == (5, 64, 5 * 63)
    assert res.ppl == pytest.approx(_reference_ppl(model, TEXT, 64, 5), rel=1e-9)
    assert res.ppl == pytest.approx(math.exp(res.nll), rel=1e-12)
    assert res.seconds > 0


def test_window_nlls_and_paired_delta() -> None:
    model = tiny_llama()
    res = perplexity(model, ByteTokenizer(), text=TEXT, seq_len=64, max_windows=5, progress=False)
    assert len(res.window_nlls) == 5
    assert sum(res.window_nlls) / 5 == pytest.approx(res.nll, rel=1e-12)  # equal-length windows
    same = paired_delta(res, res)
    assert (same.ratio, same.stderr, same.n_lower) == (0.0, 0.0, 0)

    def shifted(nlls: tuple[float, ...]) -> PerplexityResult:
        nll = sum(nlls) / len(nlls)
        return PerplexityResult(math.exp(nll), nll, res.n_tokens, 5, 64, 0.0, nlls)

    # A constant shift of 0.01 nats per token is systematic: ratio e^0.01 - 1, no spread.
    up = paired_delta(res, shifted(tuple(x + 0.01 for x in res.window_nlls)))
    assert up.ratio == pytest.approx(math.expm1(0.01), rel=1e-9) and up.stderr < 1e-12
    # ±0.01 in four windows, 0 in the fifth: mean zero, sample standard deviation 0.01.
    signs = (1, -1, 1, -1, 0)
    noisy = paired_delta(
        res, shifted(tuple(x + 0.01 * s for x, s in zip(res.window_nlls, signs, strict=True)))
    )
    expected_sd = 0.01
    assert noisy.n_lower == 2
    assert noisy.ratio == pytest.approx(0.0, abs=1e-12)
    assert noisy.stderr == pytest.approx(expected_sd / math.sqrt(5), rel=1e-9)
    with pytest.raises(ValueError, match="same windows"):
        paired_delta(
            res, perplexity(model, ByteTokenizer(), text=TEXT, seq_len=32, max_windows=5, progress=False)
        )


def test_perplexity_batching_and_all_windows() -> None:
    model = tiny_llama()
    one = perplexity(model, ByteTokenizer(), text=TEXT, seq_len=64, max_windows=None, progress=False)
    three = perplexity(
        model, ByteTokenizer(), text=TEXT, seq_len=64, max_windows=None, batch_size=3, progress=False
    )
    assert one.n_windows == len(TEXT) // 64 == three.n_windows  # the partial tail window is dropped
    assert three.ppl == pytest.approx(one.ppl, rel=1e-5)


def test_uniform_logits_give_vocab_size() -> None:
    def uniform(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 256)

    res = perplexity(uniform, ByteTokenizer(), text=TEXT, seq_len=32, max_windows=4, progress=False)
    assert res.ppl == pytest.approx(256.0, rel=1e-12)


def test_logits_accepts_output_kinds() -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    t = torch.randn(1, 4, 7)

    class WithLogits:
        logits = t

    for fn in (
        lambda x: t,
        lambda x: (t, None),
        lambda x: [t],
        lambda x: {"logits": t},
        lambda x: WithLogits(),
    ):
        assert _logits(fn, ids) is t
    with pytest.raises(TypeError, match="logits"):
        _logits(lambda x: "nope", ids)
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        _logits(lambda x: torch.zeros(1, 7), ids)


def test_perplexity_on_a_qgraph() -> None:
    from qcompile import capture

    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    qgraph = capture(model, (ids,))
    ref = perplexity(model, ByteTokenizer(), text=TEXT, seq_len=32, max_windows=2, progress=False)
    got = perplexity(qgraph, ByteTokenizer(), text=TEXT, seq_len=32, max_windows=2, progress=False)
    assert got.ppl == pytest.approx(ref.ppl, rel=1e-5)


def test_text_too_short() -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llama(), ByteTokenizer(), text="short", seq_len=64, progress=False)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_fp32_wikitext_ppl() -> None:
    from qcompile.tools.models import load_smollm2

    model, tok = load_smollm2()
    res = perplexity(model, tok, seq_len=1024, max_windows=8, progress=False)
    assert res.n_windows == 8 and res.n_tokens == 8 * 1023
    assert 28.5 <= res.ppl <= 30.0, res
