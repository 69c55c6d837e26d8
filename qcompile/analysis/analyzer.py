"""Structural analysis: find linears, norms, the residual stream, attention and MLP blocks from the
graph alone.

Module names are never matched: ``q_proj`` is "a linear whose output reaches the first (query)
input of an attention op", ``down`` is "the linear reading ``act(gate(x)) * up(x)``", a residual
writer is "a linear whose output is added to a node its own input was computed from". That is what
lets a renamed or new architecture get the same roles (tested with renamed submodules).
"""

from __future__ import annotations

import torch.fx as fx

from qcompile.analysis import patterns as P
from qcompile.analysis.attention import kv_cache_entry
from qcompile.analysis.structure import (
    AttentionSite,
    EmbeddingSite,
    LinearSite,
    MLPSite,
    NormSite,
    ResidualStream,
    Structure,
)
from qcompile.ir import QGraph, keys


def analyze(qgraph: QGraph) -> Structure:
    """Annotate ``node.meta["qcompile"]`` and return (and store in ``qgraph.info``) the Structure."""
    graph = qgraph.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        keys.clear(node, *keys.ANALYSIS_KEYS)
    st = Structure()
    for node in graph.nodes:
        if P.is_linear(node):
            st.linears[node.name] = _linear_site(qgraph, node)
        elif P.is_op(node, P.EMBEDDING_OPS) and P.is_constant(node.args[0]):
            w = qgraph.get_constant(node.args[0])
            st.embeddings.append(EmbeddingSite(node.name, str(node.args[0].target), w.shape[0], w.shape[1]))
    for match in P.find_norms(graph):
        site = NormSite(
            kind=match.kind,  # type: ignore[arg-type]
            input=match.input.name,
            output=match.output.name,
            weight=str(match.weight.target) if match.weight is not None else None,
            bias=str(match.bias.target) if match.bias is not None else None,
            eps=match.eps,
            dim=P.val_shape(match.output)[-1] if P.val_shape(match.output) else 0,
            nodes=[n.name for n in match.nodes],
            consumers=[u.name for u in P.passthrough_users(match.output)],
            module=keys.get(match.output).get(keys.MODULE, ""),
        )
        st.norms[site.output] = site
    _find_attention(graph, st)
    _find_mlps(graph, st)
    _find_residual(graph, st, order)
    _find_lm_head(qgraph, st)
    _assign_layers(graph, st, order)
    _write_meta(graph, st)
    qgraph.info[keys.INFO_STRUCTURE] = st
    return st


# ---- linears -------------------------------------------------------------------------------------


def _linear_site(qgraph: QGraph, node: fx.Node) -> LinearSite:
    w_node = node.args[1]
    b_node = P.linear_bias(node)
    out_f, in_f = qgraph.get_constant(w_node).shape
    return LinearSite(
        node=node.name,
        weight=str(w_node.target),
        bias=str(b_node.target) if b_node is not None else None,
        in_features=int(in_f),
        out_features=int(out_f),
        module=keys.get(node).get(keys.MODULE, ""),
    )


def _linear_behind(node: fx.Node, through: set) -> tuple[fx.Node | None, bool]:
    """Walk up from an attention operand to the projection that made it.

    Returns the linear and whether a non-view op (RoPE's mul/cat/neg) was crossed on the way.
    Through ``through`` ops the walk follows the first tensor argument that is not a constant or
    a cos/sin table (those come from position ids, not from the projection).
    """
    crossed = False
    seen = 0
    while isinstance(node, fx.Node) and seen < 64:
        seen += 1
        if P.is_linear(node):
            return node, crossed
        if P.is_passthrough(node) or P.is_op(node, P.PERMUTE_OPS):
            node = node.args[0]
            continue
        if P.is_op(node, through) or P.is_online_transform(node):
            crossed = True
            node = _data_operand(node)
            continue
        return None, crossed
    return None, crossed


def _data_operand(node: fx.Node) -> fx.Node | None:
    """For RoPE ops: the operand that carries the projection's data (it has a linear ancestor)."""
    args = node.args[0] if P.is_op(node, {P.aten.cat.default}) else node.args
    for arg in args:
        if isinstance(arg, fx.Node) and _has_linear_ancestor(arg, depth=12):
            return arg
    return None


def _has_linear_ancestor(node: fx.Node, depth: int) -> bool:
    if depth == 0 or not isinstance(node, fx.Node):
        return False
    if P.is_linear(node):
        return True
    return any(_has_linear_ancestor(a, depth - 1) for a in node.all_input_nodes)


def _linear_ahead(node: fx.Node) -> fx.Node | None:
    """Walk down from an attention output through views/permutes to the single output projection."""
    for _ in range(16):
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if P.is_linear(node):
            return node
        if not (P.is_passthrough(node) or P.is_op(node, P.PERMUTE_OPS)):
            return None
    return None


# ---- attention -----------------------------------------------------------------------------------


def _find_attention(graph: fx.Graph, st: Structure) -> None:
    for node in graph.nodes:
        if not P.is_op(node, P.SDPA_OPS):
            continue
        q, rope_q = _linear_behind(node.args[0], P.ROPE_OPS)
        k, rope_k = _linear_behind(node.args[1], P.ROPE_OPS)
        # v may cross the KV cache's concat(past_v, v) in a decode-step graph.
        v, _ = _linear_behind(node.args[2], {P.aten.cat.default})
        o = _linear_ahead(node)
        if not all((q, k, v, o)):
            continue
        q_shape = P.val_shape(node.args[0])  # [B, H, S, D]
        head_dim = int(q_shape[-1])
        site = AttentionSite(
            layer=None,
            q=q.name,
            k=k.name,
            v=v.name,
            o=o.name,
            num_heads=st.linears[q.name].out_features // head_dim,
            num_kv_heads=st.linears[k.name].out_features // head_dim,
            head_dim=head_dim,
            rope=rope_q and rope_k,
            attention_node=node.name,
        )
        norm = st.norm_feeding(q.name)
        site.input_norm = norm.output if norm is not None else None
        for operand, attr in ((node.args[1], "key_source"), (node.args[2], "value_source")):
            entry = kv_cache_entry(operand, site.num_kv_heads, site.head_dim)
            setattr(site, attr, entry.name if entry is not None else None)
        for name, role in ((q, "q"), (k, "k"), (v, "v"), (o, "o")):
            st.linears[name.name].role = role  # type: ignore[assignment]
        st.attentions.append(site)


# ---- MLP -----------------------------------------------------------------------------------------


def _find_mlps(graph: fx.Graph, st: Structure) -> None:
    for node in graph.nodes:
        if not P.is_linear(node) or st.linears[node.name].role != "linear":
            continue
        # After rotation (R4) down_proj reads hadamard(act(gate) * up): still the same MLP.
        producer = P.skip_online_transforms_back(node.args[0])
        if P.is_op(producer, P.MUL_OPS):
            site = _gated_mlp(producer, node, st)
        elif P.is_op(producer, P.ACTIVATION_OPS):
            site = _plain_mlp(producer, node, st)
        else:
            site = None
        if site is None:  # an activation written out, maybe behind a flattening view (GPT-2)
            producer = P.skip_passthrough_back(producer)
            if P.is_op(producer, P.ELEMENTWISE_OPS):
                site = _composite_mlp(producer, node, st)
        if site is not None:
            st.mlps.append(site)


def _gated_mlp(mul: fx.Node, down: fx.Node, st: Structure) -> MLPSite | None:
    a, b = (P.skip_passthrough_back(x) for x in mul.args[:2])
    for act, up in ((a, b), (b, a)):
        if not P.is_op(act, P.ACTIVATION_OPS) or not P.is_linear(up):
            continue
        gate = P.skip_passthrough_back(act.args[0])
        if not P.is_linear(gate) or gate.args[0] is not up.args[0]:
            continue
        st.linears[gate.name].role = "gate"
        st.linears[up.name].role = "up"
        st.linears[down.name].role = "down"
        norm = st.norm_feeding(up.name)
        return MLPSite(
            layer=None,
            kind="gated",
            activation=P.ACTIVATION_OPS[act.target],
            up=up.name,
            down=down.name,
            gate=gate.name,
            mul_node=mul.name,
            act_node=act.name,
            input_norm=norm.output if norm is not None else None,
        )
    return None


def _elementwise_root(node: fx.Node, limit: int = 32) -> fx.Node | None:
    """The one linear an elementwise function reads: every tensor leaf of the region of elementwise
    ops above ``node`` (scalars aside) is that linear's output. None for anything else — two linears
    (a residual add), a constant tensor, a region of more than ``limit`` ops."""
    roots: set[fx.Node] = set()
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if P.is_linear(cur):
            roots.add(cur)
        elif P.is_passthrough(cur):
            stack.append(cur.args[0])
        elif P.is_op(cur, P.ELEMENTWISE_OPS) and len(seen) <= limit:
            stack.extend(a for a in cur.args if isinstance(a, fx.Node))
        else:
            return None
    return roots.pop() if len(roots) == 1 else None


def _composite_mlp(act: fx.Node, fc2: fx.Node, st: Structure) -> MLPSite | None:
    """A plain MLP whose activation is written out elementwise (GPT-2's tanh-GELU)."""
    fc1 = _elementwise_root(act)
    if fc1 is None or st.linears[fc1.name].role != "linear":
        return None
    return _plain_mlp(act, fc2, st, fc1=fc1, activation="elementwise")


def _plain_mlp(
    act: fx.Node, fc2: fx.Node, st: Structure, fc1: fx.Node | None = None, activation: str | None = None
) -> MLPSite | None:
    fc1 = fc1 if fc1 is not None else P.skip_passthrough_back(act.args[0])
    if not P.is_linear(fc1) or st.linears[fc1.name].role != "linear":
        return None
    if st.linears[fc1.name].out_features != st.linears[fc2.name].in_features:
        return None
    st.linears[fc1.name].role = "fc1"
    st.linears[fc2.name].role = "fc2"
    norm = st.norm_feeding(fc1.name)
    return MLPSite(
        layer=None,
        kind="plain",
        activation=activation or P.ACTIVATION_OPS[act.target],
        up=fc1.name,
        down=fc2.name,
        act_node=act.name,
        input_norm=norm.output if norm is not None else None,
    )


# ---- residual stream -----------------------------------------------------------------------------


def _is_ancestor(candidate: fx.Node, node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Is ``candidate`` an ancestor of ``node``? DFS bounded by topological order."""
    limit = order[candidate]
    stack, seen = [node], set()
    while stack:
        cur = stack.pop()
        if cur is candidate:
            return True
        if cur in seen or order.get(cur, -1) < limit:
            continue
        seen.add(cur)
        stack.extend(cur.all_input_nodes)
    return False


def _residual_add(node: fx.Node, st: Structure, order: dict) -> tuple[fx.Node, fx.Node] | None:
    """If ``node`` is ``skip + writer(f(skip))``, return (skip, writer linear)."""
    if not P.is_op(node, P.ADD_OPS) or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    for skip, branch in ((a, b), (b, a)):
        writer = P.skip_passthrough_back(branch)
        if P.is_linear(writer) and _is_ancestor(skip, writer.args[0], order):
            return skip, writer
    return None


def _find_residual(graph: fx.Graph, st: Structure, order: dict) -> None:
    stream = ResidualStream()
    stream_nodes: set[fx.Node] = set()
    for node in graph.nodes:
        found = _residual_add(node, st, order)
        if found is None:
            continue
        skip, writer = found
        if not stream.adds:
            source = P.skip_passthrough_back(skip)
            stream.sources.append(source.name)
            stream_nodes.add(source)
        stream.adds.append(node.name)
        stream.writers.append(writer.name)
        stream_nodes.update((skip, P.skip_passthrough_back(skip), node))
    if not stream.adds:
        return
    norm_by_input = {n.input: n for n in st.norms.values()}
    norm_by_output = {n.output: n for n in st.norms.values()}
    for node in graph.nodes:
        if node not in stream_nodes:
            continue
        if node.name in norm_by_input and norm_by_input[node.name].output not in stream.readers:
            stream.readers.append(norm_by_input[node.name].output)
        if node.name in norm_by_output:
            stream.post_norm = stream.post_norm or node.name not in stream.sources
    st.residual = stream


def _find_lm_head(qgraph: QGraph, st: Structure) -> None:
    output = next(n for n in reversed(qgraph.graph.nodes) if n.op == "output")
    vocab_sizes = {e.num_embeddings: e for e in st.embeddings}
    for out in output.all_input_nodes:
        cand = P.skip_passthrough_back(out)
        if not P.is_linear(cand):
            continue
        site = st.linears[cand.name]
        if site.role == "linear" and site.out_features in vocab_sizes:
            site.role = "lm_head"
            st.lm_head = cand.name
            st.tied_embedding = site.weight == vocab_sizes[site.out_features].weight
            norm = st.norm_feeding(cand.name)
            if st.residual is not None and norm is not None:
                st.residual.final_norm = norm.output


def _assign_layers(graph: fx.Graph, st: Structure, order: dict) -> None:
    """Layer i = the i-th attention block and everything after it up to the next attention's inputs."""
    by_name = {n.name: n for n in graph.nodes}
    starts = sorted(min(order[by_name[a.q]], order[by_name[a.k]], order[by_name[a.v]]) for a in st.attentions)
    st.num_layers = len(starts)
    # Past the last residual add, nothing belongs to a block (lm_head, a BERT pooler).
    end = order[by_name[st.residual.adds[-1]]] if st.residual and st.residual.adds else len(order)

    def layer_of(name: str) -> int | None:
        idx = order[by_name[name]]
        if idx > end:
            return None
        layer = None
        for i, s in enumerate(starts):
            if idx >= s:
                layer = i
        return layer

    for a in st.attentions:
        a.layer = layer_of(a.q)
    for m in st.mlps:
        m.layer = layer_of(m.up)
    for lin in st.linears.values():
        lin.layer = None if lin.role == "lm_head" else layer_of(lin.node)
    for norm in st.norms.values():
        firsts = [c for c in norm.consumers if c in st.linears]
        norm.layer = layer_of(firsts[0]) if firsts and st.linears[firsts[0]].role != "lm_head" else None


def _write_meta(graph: fx.Graph, st: Structure) -> None:
    by_name = {n.name: n for n in graph.nodes}
    for site in st.linears.values():
        node = by_name[site.node]
        keys.set_(node, keys.LINEAR, site)
        keys.set_(node, keys.ROLE, site.role)
        keys.set_(node, keys.LAYER, site.layer)
    for norm in st.norms.values():
        node = by_name[norm.output]
        keys.set_(node, keys.NORM, norm)
        keys.set_(node, keys.ROLE, norm.kind)
        keys.set_(node, keys.LAYER, norm.layer)
    for emb in st.embeddings:
        keys.set_(by_name[emb.node], keys.ROLE, "embedding")
    if st.residual is not None:
        for add in st.residual.adds:
            keys.set_(by_name[add], keys.ROLE, "residual")
