"""qcompile: a quantization compiler for PyTorch models, LLMs first.

Front doors: :func:`capture` (torch.export) and ``torch.compile(model, backend="qcompile")``;
:func:`quantize` runs a recipe; :func:`lower` runs a target's passes (``onnx``, ``reference``) and
returns its artifact; :class:`QGraph` is the one IR.
"""

from qcompile import ops  # noqa: F401  (registers the qcompile:: custom ops a quantized graph calls)
from qcompile.frontend.capture import CaptureError, capture
from qcompile.ir import QGraph

__all__ = ["CalibrationConfig", "CaptureError", "QGraph", "QuantizedModel", "capture", "lower", "quantize"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The API pulls in the pass manager and recipes; import it on first use so `import qcompile`
    # stays light for the torch.compile entry point.
    if name in ("quantize", "lower", "QuantizedModel", "CalibrationConfig"):
        from qcompile import api

        return getattr(api, name)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")
