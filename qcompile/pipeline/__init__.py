"""The pipeline: passes, their contract, and what runs them.

- :mod:`.contract` — :class:`~.contract.Pass`, :class:`~.contract.PassResult`,
  :class:`~.contract.PassContext`, the pass registry;
- :mod:`.facts` — pre- and postconditions as checkable facts about the IR;
- :mod:`.options` — pass options checked against their dataclass;
- :mod:`.recipe` — named pipelines as data (TOML), validated before they run;
- :mod:`.manager` — :class:`~.manager.PassManager`, which runs passes with instruments observing;
- :mod:`.instruments` — dump, timing, stop-after, disable, equivalence check, IR verification;
"""
