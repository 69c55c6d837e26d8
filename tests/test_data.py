"""Shared-data discovery and the calibration/evaluation split rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qcompile.tools import data
from qcompile.tools.models import ByteTokenizer


def test_shared_data_dir_found() -> None:
    d = data.wikitext_dir()
    assert (d / data.WIKITEXT_TEST).is_file() and (d / data.WIKITEXT_VALID).is_file()


def test_env_override_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / data.WIKITEXT_VALID).write_text("a b c\r\nd e f\n")
    monkeypatch.setenv("QCOMPILE_DATA_DIR", str(tmp_path))
    assert data.wikitext_dir() == tmp_path / "wikitext-2"
    assert data.load_wikitext_valid() == "a b c\nd e f\n"  # universal newlines
    with pytest.raises(data.DataNotFoundError, match=data.WIKITEXT_TEST):
        data.load_wikitext_test()
    monkeypatch.setenv("QCOMPILE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(data.DataNotFoundError, match="QCOMPILE_DATA_DIR"):
        data.shared_data_dir()


def test_test_split_read_with_universal_newlines() -> None:
    text = data.load_wikitext_test()
    assert "\r" not in text and len(text) > 1_000_000
    assert text.startswith(" = Robert Boulter = \n")


def test_calibration_reads_only_the_valid_split(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real_read = data._read_text

    def spy(path: Path) -> str:
        read.append(Path(path).name)
        return real_read(path)

    monkeypatch.setattr(data, "_read_text", spy)
    monkeypatch.setattr(data, "load_wikitext_test", lambda: pytest.fail("calibration read the test split"))
    windows = data.calibration_windows(ByteTokenizer(), n_samples=3, seq_len=64, seed=0)
    assert read == [data.WIKITEXT_VALID]
    assert len(windows) == 3 and all(w.shape == (1, 64) and w.dtype == torch.long for w in windows)


def test_calibration_windows_come_from_valid_text_and_are_seeded() -> None:
    tok = ByteTokenizer()
    valid = data.tokenize(tok, data.load_wikitext_valid())[0]
    a = data.calibration_windows(tok, 4, 32, seed=0)
    b = data.calibration_windows(tok, 4, 32, seed=0)
    c = data.calibration_windows(tok, 4, 32, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    haystack = bytes(valid.tolist())
    for w in a:
        assert bytes(w[0].tolist()) in haystack


def test_calibration_windows_errors() -> None:
    with pytest.raises(ValueError):
        data.calibration_windows(ByteTokenizer(), 0, 16)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.calibration_windows(ByteTokenizer(), 1, 10**8)
