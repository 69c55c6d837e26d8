"""The error every stage of qcompile raises when it refuses: it names the pass, the node and the reason.

It lives below everything else (IR, equivalence engine, pipeline, backends all raise it), so no layer
imports the pass contract just to report a problem.
"""

from __future__ import annotations


class PassError(RuntimeError):
    """A pass (or a step a pass runs, such as the equivalence engine) refused or failed.

    ``pass_name`` and ``node`` say where; the message says why and, where there is one, the way out.
    """

    def __init__(self, pass_name: str, message: str, node: str | None = None) -> None:
        self.pass_name = pass_name
        self.node = node
        where = f" at node `{node}`" if node else ""
        super().__init__(f"{pass_name}{where}: {message}")
