"""The Triton backend: kernels for the registry's ops (``qcompile::qlinear_w``, ``qlinear_wa``,
``hadamard``), registered with :func:`qcompile.ops.registry.register_impl` under ``"triton"`` and with
``torch.library.triton_op`` so Inductor sees them. Every kernel is tested on CPU tensors under
``TRITON_INTERPRET=1``; the GPU timings live in ``benchmarks/``."""
