"""Channel provenance: which source channel every element of a tensor on the path holds.

The walker pushes a small integer tensor (a *probe*) along the path from the sources to the sinks,
through the layout ops themselves (view, transpose, expand, …, executed literally on the probe). A
probe element is the index of the source channel it came from, so at a sink the probe's last-dim row
is the ``channel_map`` the consumer's columns need — GQA's ``repeat_kv`` shows up as each KV head's
channels repeated for every query head of its group, whatever the exact view/expand sequence.

Shapes: a graph captured with dynamic shapes has symbolic batch/sequence sizes. Each free symbol is
given a distinct small prime (2, 3, 5, …), so a layout op that mixed a token axis into the channels
would show up as a row that is not constant over tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

PROBE_DTYPE = torch.int32
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47)


class ConcreteSizes:
    """Evaluates symbolic sizes (``SymInt`` in ``meta["val"]``) with one fixed value per free symbol."""

    def __init__(self) -> None:
        self._values: dict[Any, int] = {}

    def _value(self, symbol: Any) -> int:
        if symbol not in self._values:
            self._values[symbol] = _PRIMES[len(self._values) % len(_PRIMES)]
        return self._values[symbol]

    def size(self, size: Any) -> int:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            return int(expr.xreplace({s: self._value(s) for s in sorted(expr.free_symbols, key=str)}))
        return int(size)

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"node `{node.name}` has no tensor meta['val']")
        return tuple(self.size(d) for d in val.shape)

    def arg(self, arg: Any, probes: dict[fx.Node, Any]) -> Any:
        """A node argument made concrete: carried nodes → their probe, symbolic sizes → ints."""
        if isinstance(arg, fx.Node):
            if arg in probes:
                return probes[arg]
            val = arg.meta.get("val")
            if isinstance(val, (torch.SymInt, int)):
                return self.size(val)
            return arg  # a non-carried tensor: rules that need it read its meta["val"] themselves
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.arg(a, probes) for a in arg)
        if isinstance(arg, torch.SymInt):
            return self.size(arg)
        return arg


def seed_probe(shape: tuple[int, ...], channels: int) -> torch.Tensor:
    """The probe at a source output: element ``[..., j]`` holds source channel j."""
    return torch.arange(channels, dtype=PROBE_DTYPE).expand(shape).contiguous()


def distinct_rows(probe: torch.Tensor) -> torch.Tensor:
    """The different last-dim rows of a probe, ``[n_rows, last]``."""
    if probe.dim() == 0:
        return probe.reshape(1, 1)
    return torch.unique(probe.reshape(-1, probe.shape[-1]), dim=0)


def constant_row(probe: torch.Tensor) -> torch.Tensor | None:
    """The single last-dim row of a probe that is the same for every token, or None."""
    rows = distinct_rows(probe)
    return rows[0].long() if rows.shape[0] == 1 else None
