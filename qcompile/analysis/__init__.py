"""Structural analysis: what the graph *is*, found from the graph alone (never from module names).

- :mod:`.patterns` — what the building blocks look like in ATen (linear, norms, views, sdpa), once;
- :mod:`.attention` — what a decode step's attention core (repeat_kv, cache concat, causal mask) is;
- :mod:`.structure` — the facts found, as data classes (linears and roles, norms, attention, MLPs,
  the residual stream);
- :mod:`.analyzer` — :func:`~.analyzer.analyze`, which finds them and annotates ``node.meta``;
- :mod:`.outliers` — channel outliers and massive activations in calibration statistics;
- :mod:`.summary` — the printable account of a Structure.
"""
