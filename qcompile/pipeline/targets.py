"""Targets: what lowering appends to a recipe to turn its quantized QGraph into an artifact.

A backend registers a :class:`Target` — its name, the passes it may schedule (registered pass names:
the QGraph-level lowerings such as ``fold_qdq`` and its own ``<backend>.<pass>`` passes), an options
dataclass, and how its options choose those passes (:attr:`Target.plan`). Pass names are resolved
through the pass registry, so a backend never imports ``qcompile.passes``; the pass manager runs the
target's passes like any others, so every instrument (dump, timing, equivalence check, IR verifier,
disable) sees them. ``qcompile.lower(model, target=...)`` is the entry point
(:func:`qcompile.api.lower`).

:func:`get_target` imports ``qcompile.backends.<name>`` on first use, which registers it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qcompile.errors import PassError
from qcompile.pipeline.contract import Pass, PipelineResult
from qcompile.pipeline.options import OptionError, build_options
from qcompile.pipeline.recipe import PassSpec

__all__ = ["TARGETS", "Lowered", "Target", "TargetError", "get_target", "register_target"]


class TargetError(ValueError):
    """An unknown target or invalid target options; the message lists what is valid."""


@dataclass
class Lowered:
    """What lowering returns for a target without an artifact class of its own: the final IR and the
    pipeline that produced it."""

    target: str
    ir: Any
    pipeline: PipelineResult


# (final IR, pipeline, target options) -> the artifact ``qcompile.lower`` returns
ArtifactFactory = Callable[[Any, PipelineResult, Any], Any]


@dataclass(frozen=True)
class Target:
    """One lowering target (see the module docstring).

    Attributes:
        name: what ``qcompile.lower(..., target=name)`` and ``get_target`` take.
        pass_names: every pass the target may schedule, in pipeline order (for docs and the CLI).
        Options: the target's options dataclass (defaults and comments in one place).
        plan: ``(options, decode_step) -> [PassSpec]``: the passes to run for these options on a
            decode step (a graph with its KV cache as inputs) or on any other graph.
        artifact: builds what ``lower`` returns from the final IR (default: :class:`Lowered`).
    """

    name: str
    pass_names: tuple[str, ...]
    Options: type
    plan: Callable[[Any, bool], list[PassSpec]]
    artifact: ArtifactFactory | None = None

    def build_options(self, options: Mapping[str, Any] | Any | None) -> Any:
        """``options`` (a dict, an ``Options`` instance or None) as an ``Options`` instance."""
        if isinstance(options, self.Options):
            return options
        if options is not None and not isinstance(options, Mapping):
            raise TargetError(
                f"target {self.name!r}: options must be a dict or {self.Options.__name__}, "
                f"got {type(options).__name__}"
            )
        try:
            return build_options(self.Options, dict(options or {}), "")
        except OptionError as exc:
            raise TargetError(f"target {self.name!r}: {exc}") from None

    def passes(self, options: Any, decode_step: bool) -> list[Pass]:
        """Fresh pass objects for ``options`` (validated: an invalid pass option is a
        :class:`TargetError` naming the pass)."""
        specs = self.plan(self.build_options(options), decode_step)
        unknown = [s.name for s in specs if s.name not in self.pass_names]
        if unknown:
            raise TargetError(f"target {self.name!r} planned undeclared passes {unknown}")
        try:
            return [spec.build() for spec in specs]
        except PassError as exc:
            raise TargetError(f"target {self.name!r}: {exc}") from None

    def make_artifact(self, ir: Any, pipeline: PipelineResult, options: Any) -> Any:
        if self.artifact is None:
            return Lowered(self.name, ir, pipeline)
        return self.artifact(ir, pipeline, options)


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    if target.name in TARGETS and TARGETS[target.name] != target:
        raise ValueError(f"target {target.name!r} registered twice")
    TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    """The registered target ``name`` (importing ``qcompile.backends.<name>`` registers it)."""
    if name not in TARGETS:
        try:
            importlib.import_module(f"qcompile.backends.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"qcompile.backends.{name}":
                raise  # the backend exists but a dependency is missing (e.g. onnxruntime)
    if name not in TARGETS:
        known = ", ".join(sorted(TARGETS)) or "none imported yet; e.g. onnx, reference"
        raise TargetError(f"unknown target {name!r}; known targets: {known}")
    return TARGETS[name]
