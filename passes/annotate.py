"""``annotate``: decide how every quantizable edge is quantized, without changing a number.

PT2E style — annotate first, convert second: this pass writes one
:mod:`qcompile.quant.spec` QuantSpec per edge into ``node.meta["qcompile"]["qspec"]``; the
``quantize`` pass later realises every annotation it finds. Between the two, equivalence passes
(``smooth``, ``fuse_norms``, ``rotate``) keep the annotated nodes, and ``smooth``'s search reads the
specs of the linears it smooths into.

- **Linears**, by the role the analysis gave them: every linear gets the default scheme (the flat
  options ``weight_bits`` … ``gptq_act_order``) unless its role is in ``exclude_roles`` (default
  ``["lm_head"]``) or outside ``include_roles``. Then each table of ``overrides``, in order, selects
  linears by ``roles`` and/or ``layers`` (both given: both must match; nothing else selects — no
  module or node names) and sets any subset of the scheme fields on them, or ``skip = true`` leaves
  them float. An override that selects an excluded role includes it (how lm_head gets quantized).
  Later overrides win over earlier ones.
- **Embedding tables** (``embedding_bits``; None = float): RTN in groups of ``embedding_group_size``
  along the model dimension, symmetric by default. A table tied to an lm_head quantized on the very
  same grid is stored once (the quantize pass makes the lookup read the lm_head's dequantize).
- **KV cache** (``kv_cache_bits``; None = float): the new keys (after RoPE) and values of every
  attention block, static per channel symmetric int8 — the cache ONNX Runtime's GroupQueryAttention
  stores. Its ranges are observed by the quantize pass on the calibration batches, so a recipe with
  it needs calibration data.

A recipe reads like this (from ``qcompile/recipes/w4a16-smoothquant+-gptq-mixed.toml``)::

    [[passes]]
    name = "annotate"
    weight_bits = 4
    group_size = 128
    act_mode = "none"

    [[passes.overrides]]
    roles = ["down"]
    layers = [11]
    weight_bits = 8

The report gives how many linears each scheme covers, what was left float and why, and what each
override selected.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from qcompile.analysis import patterns as P
from qcompile.analysis.structure import AttentionSite, EmbeddingSite, LinearRole, LinearSite, Structure
from qcompile.ir import QGraph, keys
from qcompile.pipeline import facts
from qcompile.pipeline.contract import Pass, PassContext, PassError, PassResult, register_pass
from qcompile.quant.scheme import ActQuantSpec, WeightQuantSpec
from qcompile.quant.spec import (
    EmbeddingQuantSpec,
    GPTQSpec,
    KVCacheQuantSpec,
    LinearQuantSpec,
)

LINEAR_ROLES: tuple[str, ...] = typing.get_args(LinearRole)
ActMode = Literal["dynamic_per_token", "static_per_tensor", "none"]
Method = Literal["rtn", "gptq"]


@dataclass
class LinearScheme:
    """A linear's scheme as recipes spell it: flat fields, turned into a :class:`LinearQuantSpec`."""

    weight_bits: int = 8
    weight_symmetric: bool = True
    group_size: int = 0  # 0 = per output channel; g = groups of g input channels (ragged last)
    clip_search: bool = False  # search a range shrink per row/group (output error if calibrated)
    act_bits: int = 8
    act_mode: ActMode = "dynamic_per_token"
    act_symmetric: bool = True
    weight_method: Method = "rtn"  # gptq needs calibrate(hessian = true) before quantize
    gptq_block_size: int = 128  # columns per lazy-update block (GPTQ Alg. 1)
    gptq_damp: float = 0.01  # λ = damp · mean(diag H) added to H's diagonal
    gptq_act_order: bool = False  # columns by decreasing diag(H); groups stay contiguous (static)

    def spec(self) -> LinearQuantSpec:
        """The spec these fields describe (ValueError naming the bad field)."""
        gptq = GPTQSpec(self.gptq_block_size, self.gptq_damp, self.gptq_act_order)
        return LinearQuantSpec(
            WeightQuantSpec(self.weight_bits, self.weight_symmetric, self.group_size, self.clip_search),
            ActQuantSpec(self.act_bits, self.act_mode, self.act_symmetric),
            gptq if self.weight_method == "gptq" else None,
        )


SCHEME_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LinearScheme))


@dataclass
class SchemeOverride:
    """One ``[[passes.overrides]]`` table: the linears it selects (``roles`` and/or ``layers``) and
    the scheme fields it sets on them (None: keep), or ``skip = true`` to leave them float."""

    roles: list[str] | None = None
    layers: list[int] | None = None
    skip: bool = False
    weight_bits: int | None = None
    weight_symmetric: bool | None = None
    group_size: int | None = None
    clip_search: bool | None = None
    act_bits: int | None = None
    act_mode: ActMode | None = None
    act_symmetric: bool | None = None
    weight_method: Method | None = None
    gptq_block_size: int | None = None
    gptq_damp: float | None = None
    gptq_act_order: bool | None = None

    def fields_set(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SCHEME_FIELDS if getattr(self, k) is not None}

    def selects(self, site: LinearSite) -> bool:
        if self.roles is not None and site.role not in self.roles:
            return False
        return self.layers is None or site.layer in self.layers

    def describe(self) -> str:
        """``roles ['down'], layers [0, 29]``: what the override selects by."""
        parts = []
        if self.roles is not None:
            parts.append(f"roles {self.roles}")
        if self.layers is not None:
            parts.append(f"layers {self.layers}")
        return ", ".join(parts)


@register_pass
class AnnotatePass(Pass):
    """One QuantSpec per linear (by role, with per-layer overrides), embedding and KV-cache entry."""

    name: ClassVar[str] = "annotate"
    kind = "analysis"
    requires = (facts.STRUCTURE,)
    ensures = (facts.SPECS_ANNOTATED,)

    @dataclass
    class Options(LinearScheme):
        """The default scheme of the linears (the inherited fields), which linears take it, the
        per-layer overrides, and the embedding and KV-cache settings (None = float)."""

        exclude_roles: list[str] = field(default_factory=lambda: ["lm_head"])
        include_roles: list[str] | None = None  # None = every role not excluded
        overrides: list[SchemeOverride] = field(default_factory=list)
        embedding_bits: int | None = None
        embedding_group_size: int = 64
        embedding_symmetric: bool = True
        kv_cache_bits: int | None = None  # 8: int8 KV cache (ranges observed by quantize)

        def __post_init__(self) -> None:
            self.spec()  # the default scheme is valid
            _check_roles("exclude_roles", self.exclude_roles)
            if self.include_roles is not None:
                _check_roles("include_roles", self.include_roles)
            for i, override in enumerate(self.overrides):
                _check_override(self, i, override)
            self.embedding_spec()
            self.kv_cache_spec()

        def embedding_spec(self) -> EmbeddingQuantSpec | None:
            if self.embedding_bits is None:
                return None
            weight = WeightQuantSpec(self.embedding_bits, self.embedding_symmetric, self.embedding_group_size)
            return EmbeddingQuantSpec(weight)

        def kv_cache_spec(self) -> KVCacheQuantSpec | None:
            return None if self.kv_cache_bits is None else KVCacheQuantSpec(self.kv_cache_bits)

    def needs_calibration(self) -> bool:
        """KV-cache annotations make the quantize pass observe ranges on the calibration batches."""
        return self.options.kv_cache_bits is not None

    def run(self, qgraph: QGraph, ctx: PassContext) -> PassResult:
        st: Structure | None = qgraph.info.get(keys.INFO_STRUCTURE)
        if st is None:
            raise PassError(self.name, "no structure on the graph; run the analyze pass first")
        self._check_overrides_select(st)
        by_name = {n.name: n for n in qgraph.graph.nodes}
        linears, excluded = self._decide_linears(st)
        embeddings = self._embedding_sites(st)
        kv = self._kv_entries(st, by_name)
        unrecognised = [n.name for n in qgraph.graph.nodes if P.is_unrecognised_linear(n)]
        if not linears and unrecognised:
            raise PassError(
                self.name,
                f"no linear to quantize, but {len(unrecognised)} matrix products with constant weights "
                f"are in a form the compiler does not take as a linear layer ({', '.join(unrecognised[:5])}"
                f"{', …' if len(unrecognised) > 5 else ''}): the recipe would return a float model",
                node=unrecognised[0],
            )
        if not (linears or embeddings or kv):
            opts = self.options
            raise PassError(
                self.name,
                f"the options select nothing to quantize: all {len(excluded)} linears stay float "
                f"(exclude_roles {opts.exclude_roles}, include_roles {opts.include_roles}, "
                f"{len(opts.overrides)} overrides) and neither embedding_bits nor kv_cache_bits is set; "
                "include some roles or drop the annotate and quantize passes",
            )
        self._check_finite(qgraph, by_name, [*linears, *(site.node for site in embeddings)])
        embedding_rows, cache_rows = self._write(qgraph, by_name, linears, embeddings, kv)
        report = _report(self.options.overrides, st, linears, excluded, embedding_rows, cache_rows)
        report["unrecognised"] = unrecognised
        return PassResult(qgraph, changed=False, report=report, summary=_summary(report))

    def _check_finite(self, qgraph: QGraph, by_name: dict[str, fx.Node], names: list[str]) -> None:
        """A NaN or Inf weight would make every scale of its group NaN and the quantized model garbage
        with no error: refuse it here, before anything is quantized, naming the node."""
        for name in names:
            node = by_name[name]
            weight = node.args[0] if P.is_op(node, P.EMBEDDING_OPS) else node.args[1]
            if not qgraph.is_constant(weight):  # quantized by an earlier pass: reads a dequantize
                continue
            value = qgraph.get_constant(weight)
            bad = (~torch.isfinite(value)).sum().item() if value.is_floating_point() else 0
            if bad:
                raise PassError(
                    self.name,
                    f"the weight `{weight.target}` holds {bad} NaN/Inf value(s): a quantization scale "
                    "computed from it would be NaN; fix the checkpoint (or leave this linear out)",
                    node=name,
                )

    def _write(
        self,
        qgraph: QGraph,
        by_name: dict[str, fx.Node],
        linears: dict[str, LinearQuantSpec],
        embeddings: list[EmbeddingSite],
        kv: list[tuple[AttentionSite, fx.Node, fx.Node]],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Replace every annotation by the decided ones (run only once every check passed)."""
        for node in qgraph.graph.nodes:
            keys.clear(node, keys.QSPEC)
        for name, spec in linears.items():
            keys.set_(by_name[name], keys.QSPEC, spec)
        embedding_spec, kv_spec = self.options.embedding_spec(), self.options.kv_cache_spec()
        for site in embeddings:
            keys.set_(by_name[site.node], keys.QSPEC, embedding_spec)
        for _, key, value in kv:
            keys.set_(key, keys.QSPEC, kv_spec)
            keys.set_(value, keys.QSPEC, kv_spec)
        embedding_rows = [{"node": site.node, "scheme": embedding_spec.scheme()} for site in embeddings]
        cache_rows = [
            {"layer": site.layer, "key": key.name, "value": value.name, "scheme": kv_spec.scheme()}
            for site, key, value in kv
        ]
        return embedding_rows, cache_rows

    # ---- linears ----------------------------------------------------------------------------------

    def _decide_linears(self, st: Structure) -> tuple[dict[str, LinearQuantSpec], list[dict[str, Any]]]:
        """Each linear's spec (equal schemes share one spec object), and the ones left float with why."""
        specs: dict[str, LinearQuantSpec] = {}
        excluded: list[dict[str, Any]] = []
        cache: dict[tuple, LinearQuantSpec] = {}
        for site in st.linears.values():
            scheme, reason = self._decide(site)
            if scheme is None:
                excluded.append({"node": site.node, "role": site.role, "layer": site.layer, "reason": reason})
                continue
            specs[site.node] = cache.setdefault(dataclasses.astuple(scheme), scheme.spec())
        return specs, excluded

    def _decide(self, site: LinearSite) -> tuple[LinearScheme | None, str]:
        """The linear's scheme after the role filter and every override selecting it (None: float)."""
        opts = self.options
        scheme = LinearScheme(**{k: getattr(opts, k) for k in SCHEME_FIELDS})
        included, reason = True, ""
        if site.role in opts.exclude_roles:
            included, reason = False, f"role {site.role} in exclude_roles"
        elif opts.include_roles is not None and site.role not in opts.include_roles:
            included, reason = False, f"role {site.role} not in include_roles"
        for i, override in enumerate(opts.overrides):
            if not override.selects(site):
                continue
            if override.skip:
                included, reason = False, f"overrides[{i}] skips it"
                continue
            scheme = dataclasses.replace(scheme, **override.fields_set())
            included = True
        return (scheme if included else None), reason

    def _check_overrides_select(self, st: Structure) -> None:
        """Each override names layers the model has and selects at least one linear."""
        layers = st.num_layers
        present = sorted({s.role for s in st.linears.values()})
        for i, override in enumerate(self.options.overrides):
            missing = [n for n in override.layers or [] if n >= layers]
            if missing:
                raise PassError(
                    self.name,
                    f"overrides[{i}] selects layer(s) {missing} but the model has {layers} layers "
                    f"(0..{layers - 1}); fix its layers",
                )
            if not any(override.selects(s) for s in st.linears.values()):
                raise PassError(
                    self.name,
                    f"overrides[{i}] ({override.describe()}) selects no linear of this model; its "
                    f"linears have roles {', '.join(present)} (lm_head outside every layer)",
                )

    # ---- embedding and KV cache --------------------------------------------------------------------

    def _embedding_sites(self, st: Structure) -> list[EmbeddingSite]:
        if self.options.embedding_bits is None:
            return []
        if not st.embeddings:
            raise PassError(
                self.name,
                f"embedding_bits = {self.options.embedding_bits} but the analysis found no embedding "
                "(a lookup of a constant table); drop embedding_bits",
            )
        return list(st.embeddings)

    def _kv_entries(
        self, st: Structure, by_name: dict[str, fx.Node]
    ) -> list[tuple[AttentionSite, fx.Node, fx.Node]]:
        """Every attention's key and value cache entries, or a refusal naming the attention (checked
        before any annotation is written)."""
        if self.options.kv_cache_bits is None:
            return []
        if not st.attentions:
            raise PassError(
                self.name,
                "kv_cache_bits is set but the analysis found no attention block: there is no KV cache",
            )
        entries = []
        for site in st.attentions:
            pair = []
            for what, name in (("key", site.key_source), ("value", site.value_source)):
                node = by_name.get(name) if name is not None else None
                if node is None:
                    raise PassError(
                        self.name,
                        f"the {what}s entering this attention's cache were not found by the analysis "
                        "(expected [batch, kv_heads, seq, head_dim] before repeat_kv / the cache concat); "
                        "drop kv_cache_bits for this model",
                        site.attention_node,
                    )
                pair.append(node)
            entries.append((site, pair[0], pair[1]))
        return entries


# ---- option checks (run when the recipe is loaded) -------------------------------------------------


def _check_roles(where: str, roles: list[str]) -> None:
    unknown = [r for r in roles if r not in LINEAR_ROLES]
    if unknown:
        raise ValueError(f"unknown role(s) {unknown} in {where}; linear roles: {', '.join(LINEAR_ROLES)}")


def _check_override(defaults: LinearScheme, i: int, override: SchemeOverride) -> None:
    where = f"overrides[{i}]"
    if override.roles is None and override.layers is None:
        raise ValueError(f"{where} selects by roles and/or layers; give at least one of them")
    if override.roles is not None:
        if not override.roles:
            raise ValueError(f"{where}.roles is empty: it would select nothing")
        _check_roles(f"{where}.roles", override.roles)
    if override.layers is not None:
        if not override.layers or any(n < 0 for n in override.layers):
            raise ValueError(f"{where}.layers must list block indices >= 0, got {override.layers}")
    if override.skip and override.fields_set():
        raise ValueError(f"{where} has skip = true and sets {sorted(override.fields_set())}; choose one")
    scheme = LinearScheme(**{k: getattr(defaults, k) for k in SCHEME_FIELDS})
    try:
        dataclasses.replace(scheme, **override.fields_set()).spec()
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


# ---- report --------------------------------------------------------------------------------------


def _report(
    overrides: list[SchemeOverride],
    st: Structure,
    linears: dict[str, LinearQuantSpec],
    excluded: list[dict[str, Any]],
    embeddings: list[dict[str, Any]],
    caches: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "linears": dict(Counter(spec.describe() for spec in linears.values())),  # linears per scheme
        "annotated": len(linears),
        "excluded": excluded,
        "overrides": [
            {
                "override": i,
                "selects": o.describe(),
                "linears": sum(o.selects(s) for s in st.linears.values()),
            }
            for i, o in enumerate(overrides)
        ],
        "embedding": embeddings,
        "kv_cache": caches,
    }


def _summary(report: dict[str, Any]) -> str:
    schemes = ", ".join(f"{name} ×{n}" for name, n in report["linears"].items()) or "none"
    excluded = ", ".join(f"{e['node']} ({e['reason']})" for e in report["excluded"]) or "none"
    lines = [f"{report['annotated']} linears annotated: {schemes}; left float: {excluded}"]
    for o in report["overrides"]:
        lines.append(f"  overrides[{o['override']}] ({o['selects']}): {o['linears']} linears")
    if report.get("unrecognised"):
        lines.append(
            f"  WARNING: {len(report['unrecognised'])} matrix products with constant weights are not linears "
            f"the compiler quantizes and stay float: {', '.join(report['unrecognised'][:5])}"
        )
    if report["embedding"]:
        lines.append(f"  embedding: {', '.join(e['node'] + ' ' + e['scheme'] for e in report['embedding'])}")
    if report["kv_cache"]:
        lines.append(
            f"  KV cache: {report['kv_cache'][0]['scheme']} in {len(report['kv_cache'])} attention blocks"
        )
    return "\n".join(lines)
