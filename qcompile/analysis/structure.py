"""The structural facts the analysis pass finds in a QGraph, as small data classes.

Every reference is a node *name* (stable under ``QGraph.copy``) or a constant's ``get_attr`` target.
Module paths appear only in ``module`` fields, for display: nothing here is ever matched on a name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LinearRole = Literal["q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2", "lm_head", "linear"]


@dataclass
class LinearSite:
    """An ``aten.linear`` whose weight is a constant: ``y = x Wᵀ + b``, W is [out, in]."""

    node: str
    weight: str  # get_attr target of W
    bias: str | None  # get_attr target of b, or None
    in_features: int
    out_features: int
    role: LinearRole = "linear"
    layer: int | None = None
    module: str = ""  # display only


@dataclass
class NormSite:
    """A normalisation over the last dim: RMSNorm (decomposed, as transformers writes it) or LayerNorm.

    ``input`` is the normalised node (on the residual stream in a transformer), ``output`` the node its
    consumers read (after γ and β). ``weightless`` means γ is absent or was fused away.
    """

    kind: Literal["rms_norm", "layer_norm"]
    input: str
    output: str
    weight: str | None  # γ target
    bias: str | None  # β target (LayerNorm)
    eps: float
    dim: int
    # Nodes that implement the norm, from the first op reading ``input`` to ``output`` inclusive.
    nodes: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # every user of ``output`` (node names)
    layer: int | None = None
    module: str = ""


@dataclass
class AttentionSite:
    """One attention block. q/k/v/o are linear node names."""

    layer: int | None
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    attention_node: str  # the sdpa node (or the softmax of a decomposed attention)
    input_norm: str | None = None  # output node of the norm feeding q/k/v, if any
    # The new keys (after RoPE) and values ``[B, KV, S, D]`` as they enter the KV cache (the ``new``
    # of a decode step's ``cat([past, new])``) or, without a cache, attention itself (before
    # repeat_kv): where a KV-cache quantizer goes. None when the walk found no such tensor.
    key_source: str | None = None
    value_source: str | None = None

    @property
    def kv_group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class MLPSite:
    """A feed-forward block: gated (``down(act(gate(x)) * up(x))``) or plain (``fc2(act(fc1(x)))``)."""

    layer: int | None
    kind: Literal["gated", "plain"]
    activation: str  # aten op name, e.g. "silu", "gelu"
    up: str  # gated: up; plain: fc1
    down: str  # gated: down; plain: fc2
    gate: str | None = None
    mul_node: str | None = None  # gated: the act(gate) * up node
    act_node: str | None = None
    input_norm: str | None = None


@dataclass
class EmbeddingSite:
    node: str  # aten.embedding node
    weight: str  # get_attr target, [vocab, dim]
    num_embeddings: int
    dim: int


@dataclass
class ResidualStream:
    """The hidden-state stream: sources start it, writers add into it, norms read it."""

    sources: list[str] = field(default_factory=list)  # embedding nodes (the stream's start)
    adds: list[str] = field(default_factory=list)  # the add nodes that form it, in order
    writers: list[str] = field(default_factory=list)  # linears whose output is added in (o, down)
    readers: list[str] = field(default_factory=list)  # NormSite outputs that read it
    final_norm: str | None = None  # the NormSite output feeding lm_head
    post_norm: bool = False  # BERT-style: the stream passes through LayerNorm after each add


@dataclass
class Structure:
    linears: dict[str, LinearSite] = field(default_factory=dict)  # by node name
    norms: dict[str, NormSite] = field(default_factory=dict)  # by output node name
    attentions: list[AttentionSite] = field(default_factory=list)
    mlps: list[MLPSite] = field(default_factory=list)
    embeddings: list[EmbeddingSite] = field(default_factory=list)
    lm_head: str | None = None  # linear node name
    tied_embedding: bool = False  # lm_head reads the embedding's weight constant
    residual: ResidualStream | None = None
    num_layers: int = 0

    def linears_by_role(self, role: str) -> list[LinearSite]:
        return [s for s in self.linears.values() if s.role == role]

    def norm_feeding(self, linear_node: str) -> NormSite | None:
        for norm in self.norms.values():
            if linear_node in norm.consumers:
                return norm
        return None
