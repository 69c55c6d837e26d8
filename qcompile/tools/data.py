"""Text for calibration and evaluation: WikiText-2 from the project's sibling ``shared/data`` folder.

The split rule (shared/data/README.md) is enforced here rather than trusted to callers:

- calibration (:func:`calibration_windows`) reads the **validation** split, ``wiki.valid.tokens``;
- evaluation (:func:`load_wikitext_test`, used by :func:`qcompile.tools.eval.perplexity`) reads the **test**
  split, ``wiki.test.raw``.

A method tuned on test text reports a perplexity nobody can reproduce, so no function here mixes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DataNotFoundError",
    "WIKITEXT_TEST",
    "WIKITEXT_VALID",
    "calibration_windows",
    "load_wikitext_test",
    "load_wikitext_valid",
    "shared_data_dir",
    "tokenize",
    "wikitext_dir",
]

WIKITEXT_TEST = "wiki.test.raw"
WIKITEXT_VALID = "wiki.valid.tokens"
_WIKITEXT = "wikitext-2"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class DataNotFoundError(FileNotFoundError):
    """The shared data folder or one of its files is missing; the message says where we looked."""


def _candidates() -> list[Path]:
    """``<dir>/shared/data`` for the repo root, the CWD and each of their ancestors, nearest first.

    The shared folder is the repo's sibling (``<repo>/../shared``) on developer machines and in CI;
    a checkout that carries ``shared/`` inside itself is found too.
    """
    seen: list[Path] = []
    for start in (_REPO_ROOT, Path.cwd().resolve()):
        for d in (start, *start.parents):
            cand = d / "shared" / "data"
            if cand not in seen:
                seen.append(cand)
    return seen


def shared_data_dir() -> Path:
    """The shared data folder: ``$QCOMPILE_DATA_DIR`` if set, else the nearest ``shared/data`` holding
    ``wikitext-2/`` above the repo root or the current directory."""
    env = os.environ.get("QCOMPILE_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"QCOMPILE_DATA_DIR={env} is not a directory; point it at shared/data.")
        return path
    tried = _candidates()
    for cand in tried:
        if (cand / _WIKITEXT).is_dir():
            return cand
    raise DataNotFoundError(
        "could not find the shared data folder (shared/data/wikitext-2) above the repo root "
        f"{_REPO_ROOT} or the current directory {Path.cwd()}; looked in:\n  "
        + "\n  ".join(str(c) for c in tried[:8])
        + "\nSet QCOMPILE_DATA_DIR to the folder that holds wikitext-2/."
    )


def wikitext_dir() -> Path:
    """The WikiText-2 folder (``QCOMPILE_DATA_DIR`` may also name it directly)."""
    base = shared_data_dir()
    if (base / _WIKITEXT).is_dir():
        return base / _WIKITEXT
    if (base / WIKITEXT_TEST).is_file() or (base / WIKITEXT_VALID).is_file():
        return base
    raise DataNotFoundError(f"{base} has no {_WIKITEXT}/ folder; set QCOMPILE_DATA_DIR to shared/data.")


def _read_text(path: Path) -> str:
    """Read a text file with universal newlines (CRLF -> LF), the protocol our ppl numbers assume.

    wiki.test.raw ships with CRLF line endings; reading it with ``newline=None`` gives the text the
    published HF recipe tokenizes, and SmolLM2's FP32 ppl ≈ 29.19 (1024 × 8 windows) with it.
    """
    if not path.is_file():
        raise DataNotFoundError(
            f"missing data file {path}; see shared/data/README.md for what belongs there."
        )
    with open(path, encoding="utf-8", newline=None) as fh:
        return fh.read()


def load_wikitext_test() -> str:
    """The WikiText-2 raw **test** split (evaluation only, never calibration)."""
    return _read_text(wikitext_dir() / WIKITEXT_TEST)


def load_wikitext_valid() -> str:
    """The WikiText-2 tokenized **validation** split (calibration)."""
    return _read_text(wikitext_dir() / WIKITEXT_VALID)


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` in one call (the HF perplexity recipe) and return ``[1, n_tokens]`` long ids.

    Accepts a transformers tokenizer or any callable answering ``tok(text, return_tensors="pt")``
    with a mapping or object carrying ``input_ids``.
    """
    enc = tokenizer(text, return_tensors="pt")
    if isinstance(enc, Mapping) or hasattr(enc, "keys"):  # dict, transformers BatchEncoding
        ids = enc["input_ids"]
    else:
        ids = getattr(enc, "input_ids", enc)
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"tokenize: expected ids of shape [1, n], got {tuple(ids.shape)}")
    return ids


def calibration_windows(tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` random windows of ``seq_len`` tokens from the **validation** split, each ``[1, seq_len]``.

    The whole validation text is tokenized once and window starts are drawn uniformly with a private
    generator seeded by ``seed`` (the global RNG is untouched), so the same seed gives the same
    calibration set in every process.
    """
    if n_samples < 1 or seq_len < 1:
        raise ValueError(
            f"calibration_windows: need n_samples >= 1 and seq_len >= 1, got {n_samples}, {seq_len}"
        )
    ids = tokenize(tokenizer, load_wikitext_valid())[0]
    n = ids.numel()
    if n < seq_len:
        raise ValueError(
            f"calibration_windows: the validation split has {n} tokens, fewer than seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (n_samples,), generator=gen)
    return [ids[s : s + seq_len].clone().unsqueeze(0) for s in starts.tolist()]


def calibration_batches(
    tokenizer: Any, n_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> list[tuple]:
    """``n_samples`` windows of ``seq_len`` tokens from WikiText-2 **validation** (never test), each a
    1-tuple ``(input_ids [1, seq_len],)`` ready for :func:`calibrate` — see
    :func:`calibration_windows`, which owns the split rule."""
    return [(ids,) for ids in calibration_windows(tokenizer, n_samples, seq_len, seed=seed)]
