"""The one IR: :class:`QGraph` (a frozen ATen ``fx.GraphModule`` with its call signature), the keys of
everything passes record on it (:mod:`.keys`), its text form (:mod:`.printing`) and its verifier
(:mod:`.verify`)."""

from qcompile.ir import keys
from qcompile.ir.qgraph import QGraph

__all__ = ["QGraph", "keys"]
