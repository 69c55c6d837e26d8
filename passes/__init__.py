"""Built-in passes, one module per pass. Importing this package registers each of them in
:data:`qcompile.pipeline.contract.PASS_REGISTRY` (``get_pass_class`` imports it on first use)."""

from qcompile.passes import (  # noqa: F401
    analyze,
    annotate,
    calibrate,
    detect_outliers,
    fold_qdq,
    fuse_attention,
    fuse_norms,
    identity,
    keep_reference,
    lower_kernels,
    quantize,
    rotate,
    smooth,
)
