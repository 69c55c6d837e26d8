"""The equivalence engine: insert ``T·T⁻¹`` at a linear's input and absorb each half into neighbouring
constants (docs/architecture.md, "The equivalence engine"; docs/methods.md, SmoothQuant fold and rotation R1/R2).

Passes decide *what* T is; the engine decides *where* it can go and refuses loudly when it cannot::

    from qcompile.analysis.analyzer import analyze
    from qcompile.equivalence import apply_diagonal, region_for_norm

    st = analyze(qg)
    report = apply_diagonal(qg, region_for_norm(st, st.attentions[0].input_norm), s, "smooth")

Modules: ``transforms`` (T and its two halves), ``regions`` (sources → sinks, from the Structure),
``commute`` (what each op lets through), ``walk`` (the region check), ``producers`` (absorb rules),
``constants`` (float64 merge, untie), ``apply`` (entry points and reports).
"""

from qcompile.equivalence.apply import (
    AbsorbReport,
    apply_diagonal,
    apply_orthogonal,
    apply_scaled_orthogonal,
    apply_transform,
)
from qcompile.equivalence.constants import ConstantChange
from qcompile.equivalence.errors import EquivalenceError
from qcompile.equivalence.regions import (
    EmbeddingSource,
    HeadLayout,
    LinearSource,
    NormSource,
    Region,
    RegionError,
    region_for_linear_pair,
    region_for_norm,
    region_for_up_down,
    region_for_v_o,
    residual_region,
)
from qcompile.equivalence.transforms import (
    BlockOrthogonal,
    Composite,
    DenseOrthogonal,
    DiagonalScale,
    Transform,
    block_orthogonal,
    dense_orthogonal,
    diagonal_scale,
)
from qcompile.equivalence.walk import RegionCheck, check_region

__all__ = [
    "AbsorbReport",
    "BlockOrthogonal",
    "Composite",
    "ConstantChange",
    "DenseOrthogonal",
    "DiagonalScale",
    "EmbeddingSource",
    "EquivalenceError",
    "HeadLayout",
    "LinearSource",
    "NormSource",
    "Region",
    "RegionCheck",
    "RegionError",
    "Transform",
    "apply_diagonal",
    "apply_orthogonal",
    "apply_scaled_orthogonal",
    "apply_transform",
    "block_orthogonal",
    "check_region",
    "dense_orthogonal",
    "diagonal_scale",
    "region_for_linear_pair",
    "region_for_norm",
    "region_for_up_down",
    "region_for_v_o",
    "residual_region",
]
