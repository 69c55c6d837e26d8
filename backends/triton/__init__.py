"""The Triton backend: kernels for the registry's ops, registered with
:func:`qcompile.ops.registry.register_impl` under ``"triton"`` (a :class:`~qcompile.ops.registry.KernelImpl`
each) and as ``torch.library.triton_op`` so Inductor sees them.

- :mod:`.wo_linear` — ``qcompile::qlinear_w`` (int4 / int8 weight-only): split-K GEMV for M <= 8, a
  ``tl.dot`` GEMM with dequantization in the K loop above; weights repacked by :mod:`.layout`.
- :mod:`.wa_linear` (kernels in :mod:`.wa_kernels`) — ``qcompile::qlinear_wa`` (W8A8, W4A8, W4A4):
  int8 ``tl.dot`` with the scales in the epilogue, per-token activation quantization, and the fused
  ``dyn_quant_linear`` (quantize the activation and multiply in one launch).
- :mod:`.hadamard` — ``qcompile::hadamard``: a fast Walsh–Hadamard transform (2^m, K·2^m, block-diagonal,
  zero-padded plans).
- :mod:`.common` — device checks, dtypes, GPU-faithful rounding under the interpreter.

Every kernel is tested on CPU tensors under ``TRITON_INTERPRET=1`` (tests/test_triton_*.py); the GPU
timings come from ``benchmarks/triton_gemm.py`` and ``benchmarks/triton_gemm_wa.py``.
"""

from qcompile.backends.triton import hadamard, wa_linear, wo_linear  # noqa: F401  (register the kernels)
