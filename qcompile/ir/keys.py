"""Every key qcompile writes into ``node.meta``, ``qgraph.info``, ``ctx.state`` and the reports the
instruments read — the only place they are spelled. Nothing else compares these strings.

``node.meta["qcompile"]`` (one namespaced dict, so a pass never collides with torch's own meta keys;
analysis writes, rewrites read — PT2E style: annotate first, rewrite second):

| key        | written by      | value                                                                 |
|------------|-----------------|-----------------------------------------------------------------------|
| module     | capture         | dotted path of the nn.Module the node came from (display only)        |
| role       | analyze         | linear: q k v o gate up down fc1 fc2 lm_head linear; norm: rms_norm,  |
|            |                 | layer_norm; embedding; residual (an add on the residual stream)       |
| layer      | analyze         | transformer block index, or None outside blocks                       |
| linear     | analyze         | :class:`qcompile.analysis.structure.LinearSite`                       |
| norm       | analyze         | :class:`qcompile.analysis.structure.NormSite` (on the norm's output)  |
| act_stats  | calibrate       | per-channel / per-token abs-max of the linear's input                 |
| kv_stats   | quantize        | the same of the new keys / values entering a KV cache                 |
| outliers   | detect_outliers | outlier report of the linear's input                                  |
| quant      | quantize        | the scheme string applied to a linear / embedding / cache entry       |
| qspec      | annotate        | the :mod:`qcompile.quant.spec` QuantSpec to apply: on a linear, an    |
|            |                 | embedding, or the new keys / values entering a KV cache (the entry    |
|            |                 | nodes of ``AttentionSite.key_source`` / ``value_source``)             |

The structural analysis (``analyze``) rewrites only its own keys (:data:`ANALYSIS_KEYS`), so
annotations made by other passes survive a re-analysis.

``qgraph.info`` (facts about the whole graph):

| key         | written by        | value                                                          |
|-------------|-------------------|----------------------------------------------------------------|
| structure   | analyze           | :class:`qcompile.analysis.structure.Structure`                 |
| decoder     | capture_decoder   | :class:`qcompile.frontend.decoder.CacheLayout` (a decode step) |
| quantize    | quantize          | quantized node (linear, embedding, KV entry) -> scheme string  |
| fold_qdq    | fold_qdq          | node -> the folded op it became                                |
| fuse_attention | fuse_attention | :class:`qcompile.passes.fuse_attention.FuseAttentionReport`    |

``ctx.state`` (what a pass hands to later passes of the same pipeline):

| key         | written by        | value                                                          |
|-------------|-------------------|----------------------------------------------------------------|
| calibration | calibrate         | linear node -> :class:`qcompile.quant.calibration.LinearInputStats` |
| reference   | keep_reference    | a copy of the graph before lowering (read by ``onnx.verify``)  |

``PassResult.report`` keys that instruments read:

| key               | written by          | value                                                   |
|-------------------|---------------------|---------------------------------------------------------|
| transformed_nodes | equivalence passes  | nodes whose values change on purpose (inside a region)  |
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

# ---- node.meta["qcompile"] ------------------------------------------------------------------------

NAMESPACE = "qcompile"

MODULE = "module"
ROLE = "role"
LAYER = "layer"
LINEAR = "linear"
NORM = "norm"
ACT_STATS = "act_stats"
KV_STATS = "kv_stats"
OUTLIERS = "outliers"
QUANT = "quant"
# Quantization annotations (the annotate pass decides, the quantize pass converts).
QSPEC = "qspec"

KEYS = (MODULE, ROLE, LAYER, LINEAR, NORM, ACT_STATS, KV_STATS, OUTLIERS, QUANT, QSPEC)
# What the structural analysis owns: cleared and rewritten by every re-analysis.
ANALYSIS_KEYS = (ROLE, LAYER, LINEAR, NORM)

# ---- qgraph.info ---------------------------------------------------------------------------------

INFO_STRUCTURE = "structure"
INFO_DECODER = "decoder"
INFO_QUANTIZE = "quantize"
INFO_FOLD = "fold_qdq"
INFO_ATTENTION = "fuse_attention"
# node name -> the kernel (backend and op) lower_kernels chose, or why it kept the reference
INFO_KERNELS = "lower_kernels"

INFO_KEYS = (INFO_STRUCTURE, INFO_DECODER, INFO_QUANTIZE, INFO_FOLD, INFO_ATTENTION, INFO_KERNELS)

# ---- ctx.state -----------------------------------------------------------------------------------

STATE_CALIBRATION = "calibration"

STATE_KEYS = (STATE_CALIBRATION,)

# Lowering (targets): the pre-lowering graph a backend checks its artifact against.
STATE_REFERENCE = "reference"
STATE_KEYS += (STATE_REFERENCE,)

# ---- PassResult.report keys instruments read -------------------------------------------------------

REPORT_TRANSFORMED_NODES = "transformed_nodes"


def get(node: fx.Node) -> dict[str, Any]:
    """The node's qcompile annotations (created empty on first access)."""
    return node.meta.setdefault(NAMESPACE, {})


def set_(node: fx.Node, key: str, value: Any) -> None:
    if key not in KEYS:
        raise KeyError(f"unknown qcompile meta key {key!r}; documented keys: {', '.join(KEYS)}")
    get(node)[key] = value


def clear(node: fx.Node, *keys: str) -> None:
    """Drop the given annotations (every one but ``module`` when none are given)."""
    ann = get(node)
    for k in keys or tuple(ann):
        if k != MODULE:
            ann.pop(k, None)
