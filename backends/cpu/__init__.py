"""The CPU kernel backend: ``qcompile::qlinear_w`` / ``qlinear_wa`` on torch's packed int4 and int8
GEMMs (:mod:`.kernels`), registered under ``"cpu"`` with :func:`qcompile.ops.registry.register_impl`
as :class:`qcompile.ops.registry.KernelImpl` s. The ``lower_kernels`` pass picks them on CPU graphs;
``qcompile::hadamard`` has no CPU kernel (its torch reference, a fast Walsh–Hadamard transform,
is what Inductor compiles)."""

from qcompile.backends.cpu.kernels import (  # noqa: F401  (registers the implementations)
    BACKEND,
    QLINEAR_W_CPU,
    QLINEAR_W_KERNEL,
    QLINEAR_WA_CPU,
    QLINEAR_WA_KERNEL,
    kernel_group,
    pack_int4,
)

__all__ = [
    "BACKEND",
    "QLINEAR_WA_CPU",
    "QLINEAR_WA_KERNEL",
    "QLINEAR_W_CPU",
    "QLINEAR_W_KERNEL",
    "kernel_group",
    "pack_int4",
]
