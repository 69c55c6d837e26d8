"""Recipes: named pipelines as data.

A recipe is a TOML file (or the same structure as a dict)::

    [recipe]
    name = "w8a8-smoothquant"
    description = "SmoothQuant (Xiao et al. 2023): migrate activation outliers into weights, then RTN."

    [[passes]]
    name = "analyze"

    [[passes]]
    name = "smooth"
    alpha = 0.5          # every key but `name` is an option of the pass (its Options dataclass)

Shipped recipes live in ``qcompile/recipes/<name>.toml``; a user passes a path to their own file or a
dict. Everything is validated on load, before any pass runs: unknown keys, unknown passes, unknown or
mistyped options and unmet preconditions (facts a pass requires that no earlier pass ensures) are errors
that list what is valid.

The ``[recipe]`` table accepts exactly the non-pass fields of :class:`Recipe`; a top-level setting
(e.g. ``weight_bits``) is added by adding a field there, and validation follows.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qcompile.pipeline.contract import PASS_REGISTRY, Pass, PassError, get_pass_class
from qcompile.pipeline.facts import Fact
from qcompile.pipeline.options import OptionError, coerce_option

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The package directory holding the shipped ``*.toml`` recipes.
RECIPES_PACKAGE = "qcompile.recipes"
TOP_LEVEL_KEYS = ("recipe", "passes")


class RecipeError(ValueError):
    """A recipe is malformed. The message names the recipe, the place and what would be valid."""


@dataclass(frozen=True)
class PassSpec:
    """One pipeline step: a registered pass name and the options for its ``Options`` dataclass."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def pass_class(self) -> type[Pass]:
        return get_pass_class(self.name)

    def build(self) -> Pass:
        return self.pass_class()(self.options)


@dataclass
class Recipe:
    """A named pipeline. Fields other than ``passes`` and ``source`` are the ``[recipe]`` table's keys."""

    name: str
    description: str = ""
    passes: list[PassSpec] = field(default_factory=list)
    # Where it came from ("shipped", a file path, or "dict"): for error messages only.
    source: str = "dict"

    def build_passes(self) -> list[Pass]:
        """Fresh pass objects, one per step (passes hold options, so each pipeline gets its own)."""
        return [spec.build() for spec in self.passes]

    def pass_names(self) -> list[str]:
        return [spec.name for spec in self.passes]

    def appended(self, name: str, options: Mapping[str, Any] | None = None, suffix: str = "") -> Recipe:
        """A copy with one more step at the end (validated), named ``name + suffix``."""
        recipe = dataclasses.replace(
            self, name=self.name + suffix, passes=[*self.passes, PassSpec(name, dict(options or {}))]
        )
        validate_recipe(recipe)
        return recipe

    def needs_calibration(self) -> bool:
        """Some pass reads calibration batches (``calibrate``; ``annotate`` with a KV cache, whose
        ranges the ``quantize`` pass observes on them)."""
        return any(p.needs_calibration() for p in self.build_passes())

    def with_quantization(
        self,
        *,
        lm_head_bits: int | None = None,
        embedding_bits: int | None = None,
        head_group_size: int | None = None,
        kv_cache_bits: int | None = None,
    ) -> Recipe:
        """A copy (validated) whose last ``annotate`` step also quantizes the lm_head (weight-only RTN,
        symmetric groups of ``head_group_size``, default 64), the embedding table (the same grid, so a
        tied table is stored once) and/or the KV cache; None leaves a setting as the recipe has it.
        The name gets a suffix per change (``w4a16-rtn+lm_head8+emb8+kv8``).

        Raises :class:`RecipeError` when the recipe has no annotate pass (nothing to add them to) or
        no quantize pass after it (nothing would convert them).
        """
        where = f"recipe {self.name!r} ({self.source})"
        names = self.pass_names()
        if "annotate" not in names:
            raise RecipeError(
                f"{where} has no annotate pass, so lm_head / embedding / KV-cache quantization cannot be "
                f"added to it (passes: {' → '.join(names)}); choose a recipe that quantizes, or add "
                "annotate after analyze and quantize at the end"
            )
        index = len(names) - 1 - names[::-1].index("annotate")
        if "quantize" not in names[index + 1 :]:
            raise RecipeError(f"{where}: no quantize pass after annotate would convert the annotations")
        group = 64 if head_group_size is None else head_group_size
        options = dict(self.passes[index].options)
        suffix = ""
        if lm_head_bits is not None:
            head = {"roles": ["lm_head"], "weight_bits": lm_head_bits, "group_size": group}
            head |= {
                "weight_symmetric": True,
                "clip_search": False,
                "act_mode": "none",
                "weight_method": "rtn",
            }
            options["overrides"] = [*options.get("overrides", []), head]
            suffix += f"+lm_head{lm_head_bits}"
        if embedding_bits is not None:
            options |= {"embedding_bits": embedding_bits, "embedding_group_size": group}
            options["embedding_symmetric"] = True
            suffix += f"+emb{embedding_bits}"
        if kv_cache_bits is not None:
            options["kv_cache_bits"] = kv_cache_bits
            suffix += f"+kv{kv_cache_bits}"
        passes = list(self.passes)
        passes[index] = PassSpec("annotate", options)
        recipe = dataclasses.replace(self, name=self.name + suffix, passes=passes)
        validate_recipe(recipe)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """The recipe in its file shape (``load_recipe(r.to_dict())`` round-trips)."""
        header = {k: getattr(self, k) for k in recipe_table_keys()}
        return {"recipe": header, "passes": [{"name": s.name, **s.options} for s in self.passes]}


def recipe_table_keys() -> tuple[str, ...]:
    """The keys valid in ``[recipe]``: every field of :class:`Recipe` but ``passes`` and ``source``."""
    return tuple(f.name for f in dataclasses.fields(Recipe) if f.name not in ("passes", "source"))


# ---- loading -----------------------------------------------------------------------------------


def list_recipes() -> list[str]:
    """Names of the recipes shipped in the package, sorted."""
    root = resources.files(RECIPES_PACKAGE)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """A validated :class:`Recipe` from a shipped name, a path to a TOML file, or a dict.

    A string is a shipped name when one exists by that name, otherwise a path. Raises
    :class:`RecipeError` naming what is wrong and what is valid.
    """
    if isinstance(recipe, Recipe):
        validate_recipe(recipe)
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(recipe, source="dict")
    if isinstance(recipe, str) and recipe in list_recipes():
        text = resources.files(RECIPES_PACKAGE).joinpath(f"{recipe}.toml").read_text(encoding="utf-8")
        return _parse_toml(text, source=f"shipped recipe {recipe!r}", default_name=recipe)
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if path.is_file():
            return _parse_toml(path.read_text(encoding="utf-8"), source=str(path), default_name=path.stem)
        raise RecipeError(
            f"no shipped recipe or file named {str(recipe)!r}; shipped recipes: {', '.join(list_recipes())}"
        )
    raise RecipeError(f"cannot load a recipe from {type(recipe).__name__}; give a name, a path or a dict")


def _parse_toml(text: str, *, source: str, default_name: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML: {exc}") from exc
    return recipe_from_dict(data, source=source, default_name=default_name)


def recipe_from_dict(
    data: Mapping[str, Any], *, source: str = "dict", default_name: str = "custom"
) -> Recipe:
    """Build and validate a recipe from its file shape (``{"recipe": {...}, "passes": [...]}``)."""
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        hint = ""
        if any(k in recipe_table_keys() for k in unknown):
            hint = " (recipe settings such as name/description go under [recipe])"
        raise RecipeError(
            f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}{hint}; "
            f"valid top-level keys: {', '.join(TOP_LEVEL_KEYS)}"
        )
    header = data.get("recipe", {})
    if not isinstance(header, Mapping):
        raise RecipeError(f"{source}: [recipe] must be a table, got {type(header).__name__}")
    bad = [k for k in header if k not in recipe_table_keys()]
    if bad:
        raise RecipeError(
            f"{source}: unknown key(s) in [recipe]: {', '.join(map(repr, bad))}; "
            f"valid keys: {', '.join(recipe_table_keys())}"
        )
    hints = typing.get_type_hints(Recipe)
    try:
        header = {k: coerce_option(v, hints[k], k) for k, v in header.items()}
    except OptionError as exc:
        raise RecipeError(f"{source}: [recipe] {exc}") from None
    steps = data.get("passes", [])
    if not isinstance(steps, list):
        raise RecipeError(
            f"{source}: passes must be an array of tables ([[passes]]), got {type(steps).__name__}"
        )
    specs = [_pass_spec(step, i, source) for i, step in enumerate(steps, start=1)]
    recipe = Recipe(**{"name": default_name, **header}, passes=specs, source=source)
    validate_recipe(recipe)
    return recipe


def _pass_spec(step: Any, index: int, source: str) -> PassSpec:
    """``"analyze"`` or ``{name = "smooth", alpha = 0.5}`` as a PassSpec."""
    if isinstance(step, str):
        return PassSpec(step)
    if not isinstance(step, Mapping) or "name" not in step:
        raise RecipeError(f"{source}: pass #{index} must be a table with a `name` key, got {step!r}")
    options = {k: v for k, v in step.items() if k != "name"}
    return PassSpec(str(step["name"]), options)


def validate_recipe(recipe: Recipe) -> None:
    """Every pass exists, its options fit its ``Options``, and the facts it requires are ensured by an
    earlier pass and not invalidated since (:mod:`qcompile.pipeline.facts`)."""
    where = f"recipe {recipe.name!r} ({recipe.source})"
    available: set[Fact] = set()
    for i, spec in enumerate(recipe.passes, start=1):
        try:
            cls = get_pass_class(spec.name)
        except KeyError:
            hint = difflib.get_close_matches(spec.name, list(PASS_REGISTRY), n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(
                f"{where}: pass #{i}: unknown pass {spec.name!r}{did_you_mean}; "
                f"known passes: {', '.join(sorted(PASS_REGISTRY))}"
            ) from None
        try:
            pass_ = cls(spec.options)
        except PassError as exc:
            raise RecipeError(f"{where}: pass #{i}: {exc}") from None
        for fact in pass_.required_facts():
            if fact not in available:
                raise RecipeError(
                    f"{where}: pass #{i} {spec.name!r} requires {fact.description}; "
                    f"{_establishers(fact)} earlier in the recipe"
                )
        available -= set(pass_.invalidated_facts())
        available |= set(pass_.ensured_facts())


def _establishers(fact: Fact) -> str:
    from qcompile.pipeline.facts import establishing_passes

    names = establishing_passes(fact)
    return f"run {' or '.join(names)}" if names else "no registered pass establishes it; add a pass that does"
