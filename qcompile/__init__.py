"""qcompile: a quantization compiler for PyTorch models, LLMs first."""

from qcompile.capture import CaptureError, capture
from qcompile.ir import QGraph

__all__ = ["CaptureError", "QGraph", "capture"]
__version__ = "0.1.0"
