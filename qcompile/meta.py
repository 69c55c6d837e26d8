"""The documented ``node.meta["qcompile"]`` keys — the only place they are defined.

Every annotation qcompile writes on a node lives in one dict, ``node.meta["qcompile"]``, so a pass
can never collide with torch's own meta keys. Analysis writes, rewrites read (PT2E style: annotate
first, rewrite second).

| key        | written by   | value                                                                  |
|------------|--------------|------------------------------------------------------------------------|
| module     | capture      | dotted path of the nn.Module the node came from (display only)        |
| role       | analyze      | linear: q k v o gate up down fc1 fc2 lm_head linear; norm: rms_norm,  |
|            |              | layer_norm; embedding; residual (an add on the residual stream)       |
| layer      | analyze      | transformer block index, or None outside blocks                        |
| linear     | analyze      | :class:`qcompile.structure.LinearSite`                                 |
| norm       | analyze      | :class:`qcompile.structure.NormSite` (on the norm's output node)       |
| act_stats  | calibrate    | per-channel / per-token abs-max of the linear's input                  |
| kv_stats   | quantize_kv  | the same of the new keys / values entering a KV cache                  |
| outliers   | detect_outliers | outlier report of the linear's input                                |
| quant      | quantize     | the quantization scheme applied to a linear                            |
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

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

KEYS = (MODULE, ROLE, LAYER, LINEAR, NORM, ACT_STATS, KV_STATS, OUTLIERS, QUANT)


def get(node: fx.Node) -> dict[str, Any]:
    """The node's qcompile annotations (created empty on first access)."""
    return node.meta.setdefault(NAMESPACE, {})


def set_(node: fx.Node, key: str, value: Any) -> None:
    if key not in KEYS:
        raise KeyError(f"unknown qcompile meta key {key!r}; documented keys: {', '.join(KEYS)}")
    get(node)[key] = value


def clear(node: fx.Node, *keys: str) -> None:
    ann = get(node)
    for k in keys or tuple(ann):
        if k != MODULE:
            ann.pop(k, None)
