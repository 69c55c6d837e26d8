"""Recipes as data and pass Options: loading (shipped, file, dict) and validation errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from qcompile.pipeline import facts
from qcompile.pipeline.contract import PASS_REGISTRY, Pass, PassContext, PassError, PassResult
from qcompile.pipeline.recipe import PassSpec, Recipe, RecipeError, list_recipes, load_recipe


@dataclass
class Grid:
    bits: int = 4
    group_size: int | None = 128


class Scale(Pass):
    name = "t_scale"
    kind = "equivalence"
    tolerance = 1e-5

    @dataclass
    class Options:
        alpha: float = 0.5
        mode: Literal["channel", "tensor"] = "channel"
        skip_layers: tuple[int, ...] = ()
        grid: Grid = field(default_factory=Grid)

    def run(self, qgraph, ctx: PassContext) -> PassResult:  # never run here
        return PassResult(qgraph, changed=False)


class NeedsCalibration(Pass):
    name = "t_needs_calibration"
    requires = (facts.CALIBRATION,)

    def run(self, qgraph, ctx: PassContext) -> PassResult:
        return PassResult(qgraph, changed=False)


class NeedsSeed(Pass):
    name = "t_needs_seed"

    @dataclass
    class Options:
        seed: int

    def run(self, qgraph, ctx: PassContext) -> PassResult:
        return PassResult(qgraph, changed=False)


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    import qcompile.passes  # noqa: F401  (register the built-ins before adding test passes)

    monkeypatch.setitem(PASS_REGISTRY, Scale.name, Scale)
    monkeypatch.setitem(PASS_REGISTRY, NeedsSeed.name, NeedsSeed)
    monkeypatch.setitem(PASS_REGISTRY, NeedsCalibration.name, NeedsCalibration)


# ---- pass Options --------------------------------------------------------------------------------


def test_options_from_dict_with_coercions() -> None:
    p = Scale({"alpha": 1, "skip_layers": [0, 3], "grid": {"bits": 8}})
    assert p.options == Scale.Options(alpha=1.0, skip_layers=(0, 3), grid=Grid(bits=8))
    assert isinstance(p.options.alpha, float)
    assert Scale().options == Scale.Options()
    same = Scale.Options(alpha=0.2)
    assert Scale(same).options is same


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"alpah": 0.1},
            "t_scale: unknown option(s) alpah (did you mean 'alpha'?); valid options: alpha: float = 0.5",
        ),
        ({"alpha": "big"}, "t_scale: option alpha must be float, got str 'big'"),
        ({"alpha": True}, "t_scale: option alpha must be float, got bool True"),
        ({"mode": "row"}, "t_scale: option mode must be one of 'channel', 'tensor', got 'row'"),
        ({"skip_layers": [1, "x"]}, "t_scale: option skip_layers[1] must be int"),
        ({"grid": {"bitz": 3}}, "t_scale: unknown option(s) grid.bitz"),
        ({"grid": {"group_size": 1.5}}, "t_scale: option grid.group_size must be int | None"),
    ],
)
def test_bad_options_name_the_pass_and_the_valid_ones(options: dict, message: str) -> None:
    with pytest.raises(PassError) as info:
        Scale(options)
    assert str(info.value).startswith(message)


def test_required_option_and_pass_without_options() -> None:
    with pytest.raises(PassError, match="t_needs_seed: missing required option\\(s\\) seed"):
        NeedsSeed()
    assert NeedsSeed({"seed": 3}).options.seed == 3
    from qcompile.pipeline.contract import get_pass_class

    noop = get_pass_class("noop")
    with pytest.raises(PassError, match="noop: takes no options, got: alpha"):
        noop({"alpha": 1})
    assert noop().options is None


def test_describe_options() -> None:
    text = Scale.describe_options()
    assert "alpha: float = 0.5" in text and "mode: Literal['channel', 'tensor'] = 'channel'" in text


# ---- recipes -------------------------------------------------------------------------------------


def test_recipe_from_dict() -> None:
    recipe = load_recipe(
        {
            "recipe": {"name": "mine", "description": "test"},
            "passes": ["noop", {"name": "t_scale", "alpha": 0.8, "grid": {"bits": 8}}],
        }
    )
    assert recipe.name == "mine" and recipe.description == "test"
    assert recipe.passes == [PassSpec("noop"), PassSpec("t_scale", {"alpha": 0.8, "grid": {"bits": 8}})]
    passes = recipe.build_passes()
    assert [p.name for p in passes] == ["noop", "t_scale"]
    assert passes[1].options.alpha == 0.8 and passes[1].options.grid.bits == 8
    assert load_recipe(recipe.to_dict()).passes == recipe.passes


def test_user_toml_file(tmp_path) -> None:
    path = tmp_path / "my-recipe.toml"
    path.write_text(
        '[recipe]\ndescription = "from a file"\n\n'
        '[[passes]]\nname = "noop"\n\n'
        '[[passes]]\nname = "t_scale"\nalpha = 0.25\nmode = "tensor"\n\n'
        "[passes.grid]\nbits = 3\ngroup_size = 64\n"
    )
    recipe = load_recipe(path)
    assert recipe.name == "my-recipe" and recipe.source == str(path)  # name defaults to the file stem
    scale = recipe.build_passes()[1]
    assert scale.options == Scale.Options(alpha=0.25, mode="tensor", grid=Grid(3, 64))
    assert load_recipe(str(path)).passes == recipe.passes


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pases": []}, "dict: unknown top-level key(s) 'pases'; valid top-level keys: recipe, passes"),
        ({"name": "x"}, "recipe settings such as name/description go under [recipe]"),
        ({"recipe": {"nmae": "x"}}, "unknown key(s) in [recipe]: 'nmae'; valid keys: name, description"),
        ({"recipe": {"name": 3}}, "[recipe] option name must be str, got int 3"),
        ({"passes": {"name": "noop"}}, "passes must be an array of tables"),
        ({"passes": [{"alpha": 1}]}, "pass #1 must be a table with a `name` key"),
        ({"passes": ["nop"]}, "pass #1: unknown pass 'nop' (did you mean 'noop'?); known passes: "),
        (
            {"passes": ["noop", {"name": "t_scale", "beta": 1}]},
            "pass #2: t_scale: unknown option(s) beta; valid options: alpha: float = 0.5; mode:",
        ),
        (
            {"passes": ["analyze", "t_needs_calibration"]},
            "pass #2 't_needs_calibration' requires calibration statistics of the linears' inputs in the context; "
            "run calibrate earlier in the recipe",
        ),
        (
            {"passes": ["analyze", "calibrate", "fuse_norms", "rotate", "t_needs_calibration"]},
            "pass #5 't_needs_calibration' requires calibration statistics",  # rotate made them stale
        ),
        (
            {"passes": ["analyze", "rotate"]},
            "pass #2 'rotate' requires weightless norms on the residual stream (γ/β folded into the readers); "
            "run fuse_norms earlier in the recipe",
        ),
    ],
)
def test_recipe_validation_errors(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(data)
    assert message in str(info.value)


def test_unknown_pass_lists_known_passes() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe({"passes": ["smoothh"]})
    known = str(info.value).split("known passes: ")[1]
    assert {"noop", "t_scale", "t_needs_seed"} <= set(known.split(", "))


def test_bad_toml_and_unknown_name(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[recipe\nname = 1")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="no shipped recipe or file named 'w9a9'; shipped recipes: .*fp"):
        load_recipe("w9a9")


def test_recipe_object_is_validated() -> None:
    with pytest.raises(RecipeError, match="unknown pass 'nope'"):
        load_recipe(Recipe("r", passes=[PassSpec("nope")]))


def test_shipped_recipes_validate() -> None:
    # Shipped recipes name the real passes; this runs once `analyze` (and later passes) exist.
    pytest.importorskip("qcompile.passes.analyze")
    names = list_recipes()
    assert "fp" in names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name, f"{name}.toml: [recipe] name must match the file name"
        assert recipe.description, f"{name}.toml: add a description"
        recipe.build_passes()
    assert load_recipe("fp").pass_names() == ["analyze"]


def test_appended_recipe_is_validated_and_renamed() -> None:
    base = load_recipe("w4a16-rtn")
    more = base.appended("noop", suffix="+noop")
    assert more.name == "w4a16-rtn+noop" and more.pass_names() == [*base.pass_names(), "noop"]
    assert base.pass_names()[-1] == "quantize"  # the original is untouched
    with pytest.raises(RecipeError, match="unknown pass 'quantize_kv'"):
        base.appended("quantize_kv", {"bits": 8})


def test_shipped_quantizing_recipes_annotate_then_convert() -> None:
    """analyze → annotate(scheme) → … → quantize: the scheme lives in annotate, quantize has none."""
    for name in list_recipes():
        names = load_recipe(name).pass_names()
        if "quantize" not in names:
            assert "annotate" not in names, name
            continue
        assert names[:2] == ["analyze", "annotate"] and names[-1] == "quantize", (name, names)
        assert load_recipe(name).passes[-1].options == {}, name


def test_with_quantization_adds_head_embedding_and_kv_to_the_annotations() -> None:
    base = load_recipe("w4a16-rtn")
    r = base.with_quantization(lm_head_bits=8, embedding_bits=8, head_group_size=32, kv_cache_bits=8)
    assert r.name == "w4a16-rtn+lm_head8+emb8+kv8" and r.pass_names() == base.pass_names()
    annotate = r.build_passes()[1].options
    (head,) = annotate.overrides
    assert head.roles == ["lm_head"] and head.weight_bits == 8 and head.group_size == 32
    assert head.act_mode == "none" and head.weight_method == "rtn" and head.weight_symmetric
    assert annotate.embedding_spec().scheme() == "w8g32s" and annotate.kv_cache_spec().scheme() == "kv8c"
    # the scheme of the other linears is the recipe's
    assert annotate.spec() == base.build_passes()[1].options.spec()
    assert r.needs_calibration() and not base.needs_calibration()  # the KV ranges are observed on batches
    assert base.build_passes()[1].options.overrides == []  # the original is untouched
    only_kv = base.with_quantization(kv_cache_bits=8)
    assert only_kv.name == "w4a16-rtn+kv8" and only_kv.build_passes()[1].options.embedding_bits is None
    assert base.with_quantization(embedding_bits=4).build_passes()[1].options.embedding_group_size == 64


def test_with_quantization_refusals_name_the_recipe_and_the_fix() -> None:
    with pytest.raises(RecipeError, match="recipe 'fp' .* has no annotate pass.* add annotate after analyze"):
        load_recipe("fp").with_quantization(kv_cache_bits=8)
    with pytest.raises(RecipeError, match="a 4-bit KV cache is not supported"):
        load_recipe("w4a16-rtn").with_quantization(kv_cache_bits=4)
    annotate_only = load_recipe({"recipe": {"name": "a"}, "passes": ["analyze", "annotate"]})
    with pytest.raises(RecipeError, match="no quantize pass after annotate"):
        annotate_only.with_quantization(lm_head_bits=8)
