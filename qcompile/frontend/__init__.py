"""Front doors: how a model becomes a QGraph.

- :mod:`.capture` — ``torch.export`` of a module (``qcompile.capture``);
- :mod:`.dynamo` / :mod:`.compile_backend` — the graph Dynamo hands ``torch.compile(backend="qcompile")``,
  normalised into the same QGraph;
- :mod:`.decoder` — a transformers causal LM's decode step with its KV cache as tensors in and out.
"""

from qcompile.frontend.capture import CaptureError, capture

__all__ = ["CaptureError", "capture"]
