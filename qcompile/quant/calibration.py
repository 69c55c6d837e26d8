"""Calibration: activation statistics of every linear's input, gathered by running the graph on samples.

Smoothing (SmoothQuant's ``max|X_j|``), outlier detection, static activation scales, SmoothQuant+'s
α search and GPTQ all need to know what each linear *reads*. We run the QGraph on calibration batches
(windows of the WikiText-2 **validation** split, never the test split) with a ``torch.fx.Interpreter``
that looks at ``args[0]`` of each linear node as it executes and folds it into running statistics.

Memory stays bounded: the Interpreter frees each value after its last use, and an observer keeps only
fixed-size state per linear — per-channel abs-max/min/max, a seeded reservoir of ``k`` input rows, and
(on request) the ``[in, in]`` sum ``XᵀX`` — plus one float per token seen (the per-token abs-max).
No activation tensor outlives the node that reads it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from qcompile.analysis import patterns as P
from qcompile.ir import QGraph, keys

__all__ = [
    "CalibrationError",
    "LinearInputObserver",
    "LinearInputStats",
    "calibrate",
    "linear_nodes",
    "total_nbytes",
]


class CalibrationError(RuntimeError):
    """Calibration could not run; the message names the node or batch and the reason."""


@dataclass(frozen=True)
class LinearInputStats:
    """What calibration saw at one linear's input ``x`` (rows = tokens, columns = ``in_features``).

    Every field is float32 on the CPU except ``xtx`` (float64, the GPTQ Hessian wants the precision)
    and ``sample_index`` (int64).

    - ``channel_absmax[j] = max_t |x[t, j]|`` — SmoothQuant's ``max|X_j|`` and the outlier signal;
    - ``channel_min`` / ``channel_max`` — for asymmetric (zero-point) activation ranges;
    - ``token_absmax[t] = max_j |x[t, j]|`` for every token seen, in the order seen — massive
      activations and per-token dynamic scales; ``token_absmax_stale`` is set once a channel scaling
      has made it inexact (see :meth:`scale_channels`);
    - ``tensor_absmax = max |x|`` — a per-tensor static scale;
    - ``samples`` ``[k, in]``: a uniform random subset of the input rows (``k = min(sample_rows,
      n_tokens)``, seeded), to measure a quantized linear's output error without re-running the model;
      ``sample_index[i]`` is the global position (over all batches, flattened) of ``samples[i]``, and
      rows are sorted by it. With the same seed every linear with the same row count samples the same
      token positions, so samples of different linears line up.
    - ``xtx = Σ_t x_tᵀ x_t`` ``[in, in]`` (a sum, not a mean: GPTQ's ``H = 2 xtx / n_tokens``), or None
      when not requested.
    """

    node: str
    channel_absmax: torch.Tensor
    channel_min: torch.Tensor
    channel_max: torch.Tensor
    token_absmax: torch.Tensor
    tensor_absmax: float
    samples: torch.Tensor
    sample_index: torch.Tensor
    n_tokens: int
    xtx: torch.Tensor | None = None
    token_absmax_stale: bool = False

    def __deepcopy__(self, memo: dict) -> LinearInputStats:
        """Shared, not copied: stats are immutable by convention (:meth:`scale_channels` returns a new
        object), and ``QGraph.copy`` deep-copies node.meta — with ``xtx`` that would be a gigabyte per
        snapshot on a 135M model, and would split ``ctx.state`` from the meta it should mirror."""
        return self

    def __repr__(self) -> str:
        return (
            f"LinearInputStats({self.node}: in={self.in_features}, tokens={self.n_tokens}, "
            f"absmax={self.tensor_absmax:.4g}, samples={self.samples.shape[0]}, "
            f"xtx={'yes' if self.xtx is not None else 'no'}{', token_absmax stale' if self.token_absmax_stale else ''})"
        )

    @property
    def in_features(self) -> int:
        return int(self.channel_absmax.numel())

    def nbytes(self) -> int:
        """Bytes held by this object's tensors (what calibration keeps per linear)."""
        tensors = [
            self.channel_absmax,
            self.channel_min,
            self.channel_max,
            self.token_absmax,
            self.samples,
            self.sample_index,
        ]
        if self.xtx is not None:
            tensors.append(self.xtx)
        return sum(t.numel() * t.element_size() for t in tensors)

    def sample_token_absmax(self) -> torch.Tensor:
        """Per-token abs-max of the sampled rows only: exact for those tokens even after scaling."""
        return self.samples.abs().amax(dim=1) if self.samples.numel() else self.samples.new_zeros(0)

    def scale_channels(self, s: torch.Tensor) -> LinearInputStats:
        """The statistics of ``x / s`` (``s`` per input channel, nonzero), computed from these.

        A smoothing pass divides a linear's input by ``s`` (SmoothQuant: ``X diag(s)⁻¹``) and uses
        this to keep the statistics in step without re-running calibration:

        - ``channel_absmax``, ``channel_min``/``channel_max`` (swapped where ``s < 0``), ``tensor_absmax``,
          ``samples``: exact;
        - ``xtx``: exact, ``D xtx D`` with ``D = diag(1/s)``, in float64;
        - ``token_absmax``: *not* recoverable — a token's max over channels depends on which channel
          held it. It is left as it was and ``token_absmax_stale`` is set; use
          :meth:`sample_token_absmax` for exact per-token values on the sampled rows, or re-calibrate.
        """
        s = torch.as_tensor(s).detach().to("cpu").flatten()
        if s.numel() != self.in_features:
            raise ValueError(
                f"scale_channels({self.node}): got {s.numel()} scales for {self.in_features} input channels"
            )
        if bool((s == 0).any()) or not bool(torch.isfinite(s).all()):
            raise ValueError(f"scale_channels({self.node}): scales must be finite and nonzero")
        inv64 = 1.0 / s.double()
        inv = inv64.float()
        lo, hi = self.channel_min * inv, self.channel_max * inv
        positive = s > 0
        absmax = self.channel_absmax * inv.abs()
        return replace(
            self,
            channel_absmax=absmax,
            channel_min=torch.where(positive, lo, hi),
            channel_max=torch.where(positive, hi, lo),
            tensor_absmax=float(absmax.max()) if absmax.numel() else 0.0,
            samples=self.samples * inv,
            xtx=None if self.xtx is None else self.xtx * inv64[:, None] * inv64[None, :],
            token_absmax_stale=True,
        )


@dataclass
class LinearInputObserver:
    """Running statistics of one linear's input; :meth:`observe` one batch at a time, then :meth:`finalize`.

    Row sampling is reservoir sampling by random keys: every row gets a uniform key and the ``k`` rows
    with the smallest keys are kept — a uniform sample without replacement, in O(k) memory.
    """

    node: str
    in_features: int
    sample_rows: int = 256
    hessian: bool = False
    n_tokens: int = 0
    channel_absmax: torch.Tensor | None = None
    channel_min: torch.Tensor | None = None
    channel_max: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    token_absmax: list[torch.Tensor] = field(default_factory=list)
    _keys: torch.Tensor | None = None
    _rows: torch.Tensor | None = None
    _index: torch.Tensor | None = None

    def observe(self, x: torch.Tensor, keys: torch.Tensor) -> None:
        """Fold ``x`` (``[..., in_features]``) in; ``keys`` holds one uniform key per row of ``x``."""
        rows = x.detach().reshape(-1, self.in_features)
        n = rows.shape[0]
        if n == 0:
            return
        # amin + amax rather than torch.aminmax(dim=0), which is ~10× slower on CPU; the channel
        # abs-max follows from them (max(hi, -lo)) without another pass over a |x| copy.
        lo, hi = rows.amin(dim=0).float(), rows.amax(dim=0).float()
        absmax = torch.maximum(hi, -lo)
        if self.channel_absmax is None:
            self.channel_absmax, self.channel_min, self.channel_max = absmax, lo, hi
            self._keys = torch.empty(0, dtype=torch.float64, device=rows.device)
            self._rows = torch.empty(0, self.in_features, dtype=torch.float32, device=rows.device)
            self._index = torch.empty(0, dtype=torch.long, device=rows.device)
        else:
            torch.maximum(self.channel_absmax, absmax, out=self.channel_absmax)
            torch.minimum(self.channel_min, lo, out=self.channel_min)
            torch.maximum(self.channel_max, hi, out=self.channel_max)
        self.token_absmax.append(torch.maximum(rows.amax(dim=1), -rows.amin(dim=1)).float().cpu())
        if self.hessian:
            x64 = rows.double()
            if self.xtx is None:
                self.xtx = torch.zeros(
                    self.in_features, self.in_features, dtype=torch.float64, device=rows.device
                )
            self.xtx.addmm_(x64.T, x64)
        self._reservoir(rows, keys.to(rows.device))
        self.n_tokens += n

    def _reservoir(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Keep the ``k`` rows with the smallest keys among those kept so far and ``rows``.

        New rows overwrite evicted slots in place, so a batch costs O(rows it contributes), and nothing
        at all once the reservoir is full and no new key beats the largest kept one (the common case
        late in calibration, when a row enters with probability k / rows seen).
        """
        n_old = self._keys.shape[0]
        k = min(self.sample_rows, n_old + rows.shape[0])
        if n_old == k and (k == 0 or bool(keys.min() >= self._keys.max())):
            return
        chosen = torch.topk(torch.cat([self._keys, keys]), k, largest=False).indices
        new = chosen[chosen >= n_old] - n_old
        kept = torch.zeros(n_old, dtype=torch.bool, device=rows.device)
        kept[chosen[chosen < n_old]] = True
        free = torch.nonzero(~kept).flatten()
        fill, extra = new[: free.numel()], new[free.numel() :]
        index = torch.arange(self.n_tokens, self.n_tokens + rows.shape[0], device=rows.device)
        # Indexing copies: the reservoir never holds a view of (and so never pins) the activation.
        self._rows[free] = rows[fill].float()
        self._keys[free] = keys[fill]
        self._index[free] = index[fill]
        if extra.numel():  # still filling up to k
            self._rows = torch.cat([self._rows, rows[extra].float()])
            self._keys = torch.cat([self._keys, keys[extra]])
            self._index = torch.cat([self._index, index[extra]])

    def finalize(self) -> LinearInputStats:
        if self.channel_absmax is None:
            raise CalibrationError(f"calibrate: `{self.node}` was never executed on the calibration batches")
        order = torch.argsort(self._index)
        absmax = self.channel_absmax.cpu()
        return LinearInputStats(
            node=self.node,
            channel_absmax=absmax,
            channel_min=self.channel_min.cpu(),
            channel_max=self.channel_max.cpu(),
            token_absmax=torch.cat(self.token_absmax),
            tensor_absmax=float(absmax.max()),
            samples=self._rows[order].cpu(),
            sample_index=self._index[order].cpu(),
            n_tokens=self.n_tokens,
            xtx=None if self.xtx is None else self.xtx.cpu(),
        )


class _ObservingInterpreter(fx.Interpreter):
    """Runs the graph node by node and shows each observed linear its input before it executes, and
    each observed cache entry (``[B, KV, S, D]``, see :func:`calibrate`) its output after."""

    def __init__(
        self,
        gm: fx.GraphModule,
        observers: dict[str, LinearInputObserver],
        seed: int,
        output_observers: dict[str, LinearInputObserver] | None = None,
    ) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.observers = observers
        self.output_observers = output_observers or {}
        self.seed = seed
        self.batch_index = 0
        self._keys: dict[tuple[int, str], torch.Tensor] = {}

    def row_keys(self, n_rows: int, device: torch.device) -> torch.Tensor:
        """Uniform keys for this batch's rows; the same for every linear with ``n_rows`` rows."""
        cached = self._keys.get((n_rows, str(device)))
        if cached is None:
            mix = zlib.crc32(f"{self.seed}:{self.batch_index}:{n_rows}".encode())
            gen = torch.Generator().manual_seed(mix)
            cached = torch.rand(n_rows, generator=gen, dtype=torch.float64).to(device)
            self._keys[(n_rows, str(device))] = cached
        return cached

    def run_batch(self, flat_inputs: list[Any], batch_index: int) -> None:
        self.batch_index = batch_index
        self._keys.clear()
        self.run(*flat_inputs, enable_io_processing=False)

    def run_node(self, n: fx.Node) -> Any:
        observer = self.observers.get(n.name)
        if observer is not None:
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            if not isinstance(x, torch.Tensor):
                raise CalibrationError(
                    f"calibrate: input of linear `{n.name}` is {type(x).__name__}, not a tensor"
                )
            n_rows = x.numel() // observer.in_features
            observer.observe(x, self.row_keys(n_rows, x.device))
            del x
        out = super().run_node(n)
        observer = self.output_observers.get(n.name)
        if observer is not None:
            if not (isinstance(out, torch.Tensor) and out.dim() == 4):
                raise CalibrationError(f"calibrate: cache entry `{n.name}` is not a [B, KV, S, D] tensor")
            rows = out.transpose(1, 2).reshape(-1, observer.in_features)  # one row per token
            observer.observe(rows, self.row_keys(rows.shape[0], rows.device))
        return out


def linear_nodes(qgraph: QGraph) -> list[fx.Node]:
    """The linears calibration observes, in graph order: the analysis' linears if it ran, else every
    ``aten.linear`` with constant weights (:func:`qcompile.analysis.patterns.is_linear`)."""
    structure = qgraph.info.get(keys.INFO_STRUCTURE)
    if structure is not None:
        return [n for n in qgraph.graph.nodes if n.name in structure.linears]
    return [n for n in qgraph.graph.nodes if P.is_linear(n)]


def _as_tuple(batch: Any, i: int) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    raise CalibrationError(
        f"calibrate: batch {i} is a {type(batch).__name__}; expected a tuple of positional inputs"
    )


def calibrate(
    qgraph: QGraph,
    batches: Iterable[tuple | torch.Tensor],
    *,
    hessian: bool = False,
    sample_rows: int = 256,
    seed: int = 0,
    progress: bool = True,
    linears: Sequence[str] | None = None,
    cache_entries: Sequence[str] = (),
) -> dict[str, LinearInputStats]:
    """Run ``qgraph`` on each batch and return the input statistics of each linear, by node name.

    Args:
        batches: positional inputs of the captured signature, one tuple per forward (a tensor is taken
            as a 1-tuple); use :func:`qcompile.tools.data.calibration_batches` for WikiText-2 validation windows.
        hessian: also accumulate ``XᵀX`` in float64 (``[in, in]`` per linear; for GPTQ).
        sample_rows: rows kept per linear in the seeded reservoir (``samples``).
        seed: seeds the reservoir; the same seed and batches give the same samples.
        progress: a tqdm bar over batches.
        linears: node names to observe (default: every linear, see :func:`linear_nodes`).
        cache_entries: node names of ``[B, KV, S, D]`` tensors entering a KV cache (the analysis'
            ``AttentionSite.key_source`` / ``value_source``) to observe as well: their outputs, one
            row of ``KV·D`` channels per token (channel ``h·D + d`` = head ``h``, dim ``d``). Their
            stats go to ``node.meta["qcompile"]["kv_stats"]`` only, not into the returned dict.

    Each linear's stats are also written to ``node.meta["qcompile"]["act_stats"]`` (the same object).
    Linears that read the same node share the stats' tensors (treat them as read-only; use
    :meth:`LinearInputStats.scale_channels` or ``dataclasses.replace`` to derive new ones).
    """
    if sample_rows < 0:
        raise ValueError(f"calibrate: sample_rows must be >= 0, got {sample_rows}")
    nodes = linear_nodes(qgraph)
    if linears is not None:
        by_name = {n.name: n for n in nodes}
        unknown = [name for name in linears if name not in by_name]
        if unknown:
            raise CalibrationError(
                f"calibrate: {', '.join(unknown)} not linear node(s) of this graph; "
                f"known linears: {', '.join(list(by_name)[:8])}{' …' if len(by_name) > 8 else ''}"
            )
        nodes = [by_name[name] for name in linears]
    # Linears reading the same node (q/k/v off one norm, gate/up) see the same input: observe it once
    # (a third of the work and memory on a Llama) and give each its own stats object over shared tensors.
    observers: dict[str, LinearInputObserver] = {}  # first reader's name -> observer
    first_reader: dict[fx.Node, str] = {}
    for n in nodes:
        if n.args[0] not in first_reader:
            first_reader[n.args[0]] = n.name
            in_features = int(qgraph.get_constant(n.args[1]).shape[1])
            observers[n.name] = LinearInputObserver(n.name, in_features, sample_rows, hessian)
    by_name = {n.name: n for n in qgraph.graph.nodes}
    entries: dict[str, LinearInputObserver] = {}
    for name in cache_entries:
        shape = P.val_shape(by_name[name]) if name in by_name else ()
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            raise CalibrationError(
                f"calibrate: cache entry `{name}` is not a [B, KV, S, D] node of this graph"
            )
        entries[name] = LinearInputObserver(name, int(shape[1] * shape[3]), sample_rows, False)
    interp = _ObservingInterpreter(qgraph.graph_module, observers, seed, entries)
    device = qgraph.device
    with torch.no_grad():
        for i, batch in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in _as_tuple(batch, i))
            interp.run_batch(qgraph.flatten_inputs(args), i)
    shared = {name: obs.finalize() for name, obs in observers.items()}
    stats = {}
    for n in nodes:
        stats[n.name] = replace(shared[first_reader[n.args[0]]], node=n.name)
        keys.set_(n, keys.ACT_STATS, stats[n.name])
    for name, observer in entries.items():
        keys.set_(by_name[name], keys.KV_STATS, observer.finalize())
    return stats


def total_nbytes(stats: dict[str, LinearInputStats]) -> int:
    """Bytes the statistics hold, counting tensors shared between linears once."""
    seen: dict[int, int] = {}
    for st in stats.values():
        for t in (
            st.channel_absmax,
            st.channel_min,
            st.channel_max,
            st.token_absmax,
            st.samples,
            st.sample_index,
            st.xtx,
        ):
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
