"""Perplexity on WikiText-2 test: the number every quantization recipe is judged by.

Protocol (docs/architecture.md, "Models and data"): the test text (``wiki.test.raw`` read with universal
newlines) is tokenized once, as a whole; it is cut into non-overlapping windows of ``seq_len`` tokens
from the start (a trailing partial window is dropped); within each window tokens 1..L-1 are predicted
from their prefix; ppl = exp(total NLL / predicted tokens). SmolLM2-135M FP32 at 1024 × 8 windows
gives ≈ 29.2. The loss is reduced in float64 so that a recipe's delta is not rounding noise.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qcompile.tools.data import load_wikitext_test, tokenize

__all__ = ["PairedDelta", "PerplexityResult", "paired_delta", "perplexity"]

# Rows of logits turned into float64 log-probabilities at a time: bounds memory at vocab 49k.
_ROW_CHUNK = 256


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement.

    ``nll`` is the mean negative log-likelihood per predicted token (nats), so ``ppl == exp(nll)``;
    ``n_tokens`` counts predicted tokens (``n_windows * (seq_len - 1)``); ``window_nlls`` holds each
    window's mean NLL per predicted token, in window order (for paired comparisons of two models on
    the same windows, :func:`paired_delta`).
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int
    seconds: float
    window_nlls: tuple[float, ...] = ()

    def __str__(self) -> str:
        return (
            f"ppl {self.ppl:.4f} (nll {self.nll:.5f}, {self.n_windows} × {self.seq_len} tokens, "
            f"{self.seconds:.1f} s)"
        )


def _is_hf_model(model: Any) -> bool:
    """A transformers model (or a torch.compile wrapper of one): it takes ``input_ids=``/``use_cache=``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(getattr(model, "_orig_mod", model), PreTrainedModel)


def _call(model: Any, ids: torch.Tensor) -> Any:
    from qcompile.ir import QGraph

    if _is_hf_model(model):
        return model(input_ids=ids, use_cache=False)
    if isinstance(model, QGraph):
        try:
            return model(ids)
        except TypeError as exc:  # captured with input_ids= as a keyword
            if "captured signature" not in str(exc):
                raise
            return model(input_ids=ids)
    return model(ids)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, L, V]`` of ``ids`` ``[B, L]`` from an HF causal LM, a QGraph or any callable.

    The output may be a ModelOutput (``.logits``), a mapping with ``"logits"``, a tuple/list whose
    first element is the logits (HF ``return_dict=False``, a flat QGraph output) or a tensor.
    """
    out = _call(model, ids)
    if isinstance(out, torch.Tensor):
        logits = out
    elif getattr(out, "logits", None) is not None:
        logits = out.logits
    elif isinstance(out, dict) and "logits" in out:
        logits = out["logits"]
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    else:
        raise TypeError(
            f"perplexity: cannot find logits in the model output of type {type(out).__name__}; "
            "return a tensor [B, L, V], a tuple whose first item is one, or an object with .logits."
        )
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"perplexity: expected logits [B, L, V] for ids {tuple(ids.shape)}, got {tuple(logits.shape)}"
        )
    return logits


def _device_of(model: Any) -> torch.device:
    """Where the model's weights live (ids go there); CPU when it has none we can see."""
    from qcompile.ir import QGraph

    module = model.graph_module if isinstance(model, QGraph) else model
    if isinstance(module, torch.nn.Module):
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.device("cpu")


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL (float64) of ``targets`` ``[N]`` under ``logits`` ``[N, V]``, in row chunks."""
    total = 0.0
    for i in range(0, targets.numel(), _ROW_CHUNK):
        rows = logits[i : i + _ROW_CHUNK].to(torch.float64)
        total += F.cross_entropy(rows, targets[i : i + _ROW_CHUNK], reduction="sum").item()
    return total


def perplexity(
    model: Any,
    tokenizer: Any,
    text: str | None = None,
    seq_len: int = 1024,
    max_windows: int | None = 8,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: WikiText-2 test) in non-overlapping windows.

    Args:
        model: an HF causal LM, a :class:`qcompile.QGraph`, or any callable ``ids -> logits``.
        tokenizer: the model's tokenizer (called once on the whole text).
        text: the text to score; None reads ``wiki.test.raw`` (universal newlines).
        seq_len: tokens per window; each window predicts ``seq_len - 1`` tokens.
        max_windows: at most this many windows from the start; None for every full window.
        batch_size: windows per forward call.
        progress: show a tqdm bar.
    """
    if seq_len < 2:
        raise ValueError(f"perplexity: seq_len must be >= 2 to predict anything, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}")
    if text is None:
        text = load_wikitext_test()
    ids = tokenize(tokenizer, text)[0]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(
            f"perplexity: the text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = _device_of(model)
    if isinstance(model, torch.nn.Module) and model.training:
        # Dropout would make the number meaningless, and we never change the caller's module.
        raise ValueError("perplexity: the model is in training mode; call model.eval() first")

    start = time.perf_counter()
    total_nll = 0.0
    n_tokens = 0
    window_nlls: list[float] = []
    with torch.no_grad(), tqdm(total=n_windows, desc="perplexity", unit="win", disable=not progress) as bar:
        for b in range(0, n_windows, batch_size):
            batch = windows[b : b + batch_size].to(device)
            logits = _logits(model, batch)
            for row in range(batch.shape[0]):
                window = _window_nll(logits[row, :-1], batch[row, 1:])
                window_nlls.append(window / (seq_len - 1))
                total_nll += window
                n_tokens += seq_len - 1
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total_nll / n_tokens):.3f}")
    nll = total_nll / n_tokens
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        n_tokens=n_tokens,
        n_windows=n_windows,
        seq_len=seq_len,
        seconds=time.perf_counter() - start,
        window_nlls=tuple(window_nlls),
    )


@dataclass(frozen=True)
class PairedDelta:
    """``b`` vs ``a`` on the same windows: ``ratio = ppl_b / ppl_a - 1``; ``stderr`` is the standard
    error of that ratio estimated from the spread of the per-window NLL differences (a difference
    that is noise has mixed signs and ``|ratio|`` of the order of ``stderr``; a systematic one
    has ``|ratio| >> stderr``); ``n_lower`` counts the windows where ``b`` has the lower NLL."""

    ratio: float
    stderr: float
    n_lower: int
    n_windows: int

    def __str__(self) -> str:
        return (
            f"{100 * self.ratio:+.2f} % ± {100 * self.stderr:.2f} % (1 s.e.; "
            f"lower in {self.n_lower}/{self.n_windows} windows)"
        )


def paired_delta(a: PerplexityResult, b: PerplexityResult) -> PairedDelta:
    """Compare two perplexity results measured on the same windows (see :class:`PairedDelta`)."""
    if len(a.window_nlls) != len(b.window_nlls) or a.seq_len != b.seq_len or not a.window_nlls:
        raise ValueError(
            "paired_delta: the two results must come from the same windows "
            f"(got {len(a.window_nlls)} × {a.seq_len} and {len(b.window_nlls)} × {b.seq_len})"
        )
    diffs = [y - x for x, y in zip(a.window_nlls, b.window_nlls, strict=True)]
    n = len(diffs)
    # ppl_b / ppl_a = exp(mean NLL difference) (windows have equal token counts); its standard
    # error by the delta method.
    growth = math.exp(b.nll - a.nll)
    stderr = growth * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    return PairedDelta(ratio=growth - 1.0, stderr=stderr, n_lower=sum(d < 0 for d in diffs), n_windows=n)
