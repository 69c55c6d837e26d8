"""Shared fixtures. Fast tests use tiny random models; `real` tests load the packaged SmolLM2/MiniLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every pipeline in the tests checks the IR after each pass (qcompile.ir.verify).
os.environ.setdefault("QCOMPILE_VERIFY_IR", "1")
# Triton kernels run on CPU tensors through Triton's interpreter (set before triton is imported).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two torch threads per test process, or the cores shared out among pytest-xdist's workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the packaged SmolLM2-135M, loaded once per session."""
    from qcompile.tools.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_qgraph(smollm2):
    """SmolLM2 captured once per session (dynamic batch/sequence), with its example input ids."""
    import qcompile

    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    return qcompile.capture(model, (ids,)), ids


@pytest.fixture(scope="session")
def tiny_model():
    """A tiny random Llama (``qcompile.tools.models.tiny_llama``), shared by the session: tests read it
    and capture it (capture copies the weights), never change it."""
    from qcompile.tools.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_decoder(tiny_model):
    """The decode-step QGraph of ``tiny_model``, captured once per session (pipelines work on copies;
    the teardown checks that no test changed it)."""
    from qcompile.frontend.decoder import capture_decoder

    qgraph = capture_decoder(tiny_model)
    before = qgraph.print_readable()
    yield qgraph
    assert qgraph.print_readable() == before, "a test changed the shared tiny_decoder capture"


@pytest.fixture(scope="session")
def rope_model():
    """A tiny random Llama with head_dim 16: ORT's GroupQueryAttention rotates in-kernel only for head
    sizes that are multiples of 16 (``tiny_model``'s is 8), so the ONNX rewrite tests use this one."""
    from qcompile.tools.models import tiny_llama

    return tiny_llama(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@pytest.fixture(scope="session")
def rope_decoder(rope_model):
    """The decode-step QGraph of ``rope_model``, captured once per session and checked unchanged."""
    from qcompile.frontend.decoder import capture_decoder

    qgraph = capture_decoder(rope_model)
    before = qgraph.print_readable()
    yield qgraph
    assert qgraph.print_readable() == before, "a test changed the shared rope_decoder capture"
