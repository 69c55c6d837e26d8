"""How the equivalence engine refuses: one error type that names the pass, the node, the op, the
reason and the way out (docs/architecture.md, "Errors name the place")."""

from __future__ import annotations

from qcompile.errors import PassError


class EquivalenceError(PassError):
    """A half of ``T·T⁻¹`` cannot be absorbed where the region asks for it.

    Attributes (besides ``pass_name`` and ``node``): ``op`` (the ATen op at ``node``, or a short
    description), ``reason`` and ``way_out``, so callers (e.g. a smoothing pass that skips illegal
    groups) can report them structurally.
    """

    def __init__(
        self,
        pass_name: str,
        *,
        transform: str,
        node: str,
        op: str,
        reason: str,
        way_out: str,
        region: str | None = None,
    ) -> None:
        where = f" in region {region}" if region else ""
        message = f"cannot absorb {transform} past node `{node}` ({op}){where}: {reason}; {way_out}"
        super().__init__(pass_name, message)
        self.node = node
        self.op = op
        self.reason = reason
        self.way_out = way_out
        self.region = region
        self.transform = transform


class Refusal(ValueError):
    """Internal: a commute or absorb rule said no. The walker turns it into an :class:`EquivalenceError`
    with the node, op and region filled in."""

    def __init__(self, reason: str, way_out: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.way_out = way_out
