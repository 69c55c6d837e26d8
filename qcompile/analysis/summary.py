"""Printable summary of a Structure: what the analysis found, layer by layer."""

from __future__ import annotations

from collections import Counter

from qcompile.analysis.structure import Structure
from qcompile.ir import QGraph


def format_structure(st: Structure, qgraph: QGraph | None = None, *, max_layers: int = 4) -> str:
    """A compact, human-readable account of the model's structure (module names shown, never used)."""
    roles = Counter(s.role for s in st.linears.values())
    norms = Counter(n.kind for n in st.norms.values())
    lines = ["Structure"]
    if qgraph is not None:
        n_ops = sum(1 for n in qgraph.graph.nodes if n.op == "call_function")
        lines.append(
            f"  graph: {n_ops} ATen ops, {qgraph.num_parameters():,} constant values ({qgraph.source})"
        )
    lines.append(f"  layers: {st.num_layers}")
    lines.append("  linears: " + ", ".join(f"{r}×{c}" for r, c in sorted(roles.items())))
    lines.append("  norms: " + (", ".join(f"{k}×{c}" for k, c in sorted(norms.items())) or "none"))
    for emb in st.embeddings:
        lines.append(f"  embedding: {emb.node} [{emb.num_embeddings}×{emb.dim}]")
    if st.lm_head:
        tied = "tied to the embedding" if st.tied_embedding else "own weight"
        lines.append(f"  lm_head: {st.lm_head} ({tied})")
    if st.attentions:
        a = st.attentions[0]
        gqa = f", GQA groups of {a.kv_group_size}" if a.num_kv_heads != a.num_heads else ""
        lines.append(
            f"  attention: {len(st.attentions)} blocks, {a.num_heads} heads / {a.num_kv_heads} KV heads, "
            f"head_dim {a.head_dim}{gqa}, RoPE {'yes' if a.rope else 'no'}"
        )
    if st.mlps:
        m = st.mlps[0]
        lines.append(f"  mlp: {len(st.mlps)} blocks, {m.kind} ({m.activation})")
    if st.residual is not None:
        r = st.residual
        kind = "post-norm (norm after each add)" if r.post_norm else "pre-norm"
        lines.append(
            f"  residual stream: {kind}; sources {r.sources}, {len(r.writers)} writers, "
            f"{len(r.readers)} norm readers, final norm {r.final_norm}"
        )
    for layer in range(min(st.num_layers, max_layers)):
        lines.append(f"  layer {layer}:")
        for site in st.linears.values():
            if site.layer == layer:
                mod = f"  [{site.module}]" if site.module else ""
                lines.append(
                    f"    {site.role:<6} {site.node:<12} {site.in_features:>6} → {site.out_features:<6}{mod}"
                )
    if st.num_layers > max_layers:
        lines.append(f"  … {st.num_layers - max_layers} more layers of the same shape")
    return "\n".join(lines)
