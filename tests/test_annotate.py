"""The annotate pass: one QuantSpec per linear (by role, with per-layer overrides), embedding and KV-cache
entry; the annotations survive the equivalence passes and a re-analysis; the quantize pass converts
exactly what was annotated (mixed precision included); bad options are refused with the way out."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qcompile
from qcompile.ir import keys
from qcompile.passes.analyze import AnalyzePass
from qcompile.passes.annotate import SCHEME_FIELDS, AnnotatePass, SchemeOverride
from qcompile.pipeline.contract import PassContext, PassError
from qcompile.pipeline.recipe import RecipeError, load_recipe
from qcompile.quant.spec import EmbeddingQuantSpec, KVCacheQuantSpec, LinearQuantSpec
from qcompile.tools.models import tiny_llama

W4 = {"weight_bits": 4, "group_size": 16, "act_mode": "none"}
CALIBRATION = [
    (torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(i)),) for i in range(2)
]


@pytest.fixture(scope="module")
def analyzed():
    """Tiny Llama (2 layers, tied embedding) captured and analysed once; tests annotate copies."""
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    qg = qcompile.capture(tiny_llama(), (ids,))
    AnalyzePass()(qg, PassContext())
    return qg, ids


def _annotate(analyzed, options: dict):
    qg = analyzed[0].copy()
    result = AnnotatePass(options)(qg, PassContext())
    return qg, result


def _specs(qg) -> dict[str, object]:
    return {n.name: n.meta[keys.NAMESPACE][keys.QSPEC] for n in qg.graph.nodes if keys.QSPEC in keys.get(n)}


def _recipe(*passes) -> dict:
    return {"recipe": {"name": "t"}, "passes": list(passes)}


# ---- linears by role -------------------------------------------------------------------------------


def test_every_linear_but_lm_head_gets_the_default_scheme(analyzed):
    qg, result = _annotate(analyzed, W4)
    st = qg.info["structure"]
    specs = _specs(qg)
    assert set(specs) == {s.node for s in st.linears.values() if s.role != "lm_head"}
    assert {spec.describe() for spec in specs.values()} == {"w4g16s-a16 rtn"}
    assert result.report["linears"] == {"w4g16s-a16 rtn": len(st.linears) - 1}
    assert result.report["excluded"] == [
        {"node": st.lm_head, "role": "lm_head", "layer": None, "reason": "role lm_head in exclude_roles"}
    ]
    assert not result.changed and "14 linears annotated: w4g16s-a16 rtn ×14" in result.summary


def test_gptq_and_activation_fields_make_one_spec(analyzed):
    options = {
        **W4,
        "weight_method": "gptq",
        "gptq_act_order": True,
        "act_bits": 8,
        "act_mode": "static_per_tensor",
    }
    qg, _ = _annotate(analyzed, options)
    (spec,) = set(_specs(qg).values())
    assert spec.method == "gptq" and spec.gptq.act_order and spec.gptq.block_size == 128
    assert spec.needs_hessian and spec.needs_act_range and spec.scheme() == "w4g16s-a8ps"


def test_include_roles_leaves_the_rest_float(analyzed):
    qg, result = _annotate(analyzed, {**W4, "include_roles": ["q", "k"]})
    st = qg.info["structure"]
    assert {st.linears[n].role for n in _specs(qg)} == {"q", "k"}
    reasons = {e["role"]: e["reason"] for e in result.report["excluded"]}
    assert reasons["v"] == "role v not in include_roles"


# ---- overrides ---------------------------------------------------------------------------------------


def test_overrides_select_by_role_and_layer_and_later_ones_win(analyzed):
    overrides = [
        {"roles": ["down"], "layers": [1], "weight_bits": 8},  # one linear
        {"layers": [0], "act_mode": "dynamic_per_token", "act_bits": 8},  # every linear of layer 0
        {"roles": ["up"], "layers": [0], "group_size": 32},  # on top of the previous one
        {"roles": ["gate"], "skip": True},  # float in every layer
    ]
    qg, result = _annotate(analyzed, {**W4, "overrides": overrides})
    specs = _specs(qg)
    for site in qg.info["structure"].linears.values():
        if site.role in ("gate", "lm_head"):
            assert site.node not in specs, site
            continue
        weight, act = specs[site.node].weight, specs[site.node].act
        assert weight.bits == (8 if (site.role, site.layer) == ("down", 1) else 4)
        assert weight.group_size == (32 if (site.role, site.layer) == ("up", 0) else 16)
        assert act.mode == ("dynamic_per_token" if site.layer == 0 else "none")
        assert weight.symmetric and not weight.clip_search  # fields no override set keep the default
    assert [o["linears"] for o in result.report["overrides"]] == [1, 7, 1, 2]
    gate = [e for e in result.report["excluded"] if e["role"] == "gate"]
    assert {e["reason"] for e in gate} == {"overrides[3] skips it"}


def test_an_override_selecting_lm_head_includes_it(analyzed):
    qg, _ = _annotate(
        analyzed, {**W4, "overrides": [{"roles": ["lm_head"], "weight_bits": 8, "group_size": 16}]}
    )
    st = qg.info["structure"]
    spec = _specs(qg)[st.lm_head]
    assert spec.scheme() == "w8g16s-a16" and len(_specs(qg)) == len(st.linears)


def test_override_fields_match_the_scheme_fields():
    """Every scheme field can be overridden, and an override has nothing else but its selectors."""
    names = {f.name for f in dataclasses.fields(SchemeOverride)}
    assert names == {"roles", "layers", "skip", *SCHEME_FIELDS}


# ---- embedding and KV cache ----------------------------------------------------------------------------


def test_embedding_and_kv_cache_specs(analyzed):
    qg, result = _annotate(analyzed, {**W4, "embedding_bits": 8, "kv_cache_bits": 8})
    st = qg.info["structure"]
    specs = _specs(qg)
    (emb,) = st.embeddings
    assert specs[emb.node] == EmbeddingQuantSpec(
        dataclasses.replace(specs[st.attentions[0].q].weight, bits=8, group_size=64)
    )
    entries = {n for a in st.attentions for n in (a.key_source, a.value_source)}
    assert len(entries) == 2 * st.num_layers
    assert all(specs[n] == KVCacheQuantSpec(8) for n in entries)
    assert result.report["embedding"] == [{"node": emb.node, "scheme": "w8g64s"}]
    assert [r["layer"] for r in result.report["kv_cache"]] == list(range(st.num_layers))
    assert AnnotatePass({"kv_cache_bits": 8}).needs_calibration() and not AnnotatePass(W4).needs_calibration()
    assert load_recipe(
        _recipe("analyze", {"name": "annotate", "kv_cache_bits": 8}, "quantize")
    ).needs_calibration()


def test_kv_cache_and_embedding_refusals():
    with pytest.raises(PassError, match="a 4-bit KV cache is not supported; only an 8-bit cache"):
        AnnotatePass({"kv_cache_bits": 4})
    with pytest.raises(PassError, match="a 4-bit embedding must be symmetric"):
        AnnotatePass({"embedding_bits": 4, "embedding_symmetric": False})


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [{"roles": ["qproj"], "weight_bits": 8}],
            r"unknown role\(s\) \['qproj'\] in overrides\[0\]\.roles; linear roles: q, k",
        ),
        (
            [{"roles": ["q"], "weight_bitz": 8}],
            r"unknown option\(s\) overrides\[0\]\.weight_bitz \(did you mean",
        ),
        (
            [{"modules": ["model.layers.0.mlp"], "weight_bits": 8}],
            r"unknown option\(s\) overrides\[0\]\.modules",
        ),
        ([{"nodes": ["linear_3"], "weight_bits": 8}], r"unknown option\(s\) overrides\[0\]\.nodes"),
        ([{"weight_bits": 8}], r"overrides\[0\] selects by roles and/or layers; give at least one"),
        ([{"roles": ["q"], "weight_bits": 16}], r"overrides\[0\]: bits must be in 2\.\.8"),
        ([{"layers": [-1], "weight_bits": 8}], r"overrides\[0\]\.layers must list block indices >= 0"),
        (
            [{"roles": ["q"], "skip": True, "weight_bits": 8}],
            r"overrides\[0\] has skip = true and sets \['weight_bits'\]",
        ),
        (
            [{"roles": ["q"], "act_mode": "per_channel"}],
            r"option overrides\[0\]\.act_mode must be .*got str 'per_channel'",
        ),
    ],
)
def test_bad_overrides_are_refused_when_the_recipe_loads(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe("analyze", {"name": "annotate", "overrides": overrides}, "quantize"))


def test_unknown_roles_in_the_role_filters_are_refused():
    with pytest.raises(PassError, match=r"unknown role\(s\) \['head'\] in exclude_roles"):
        AnnotatePass({"exclude_roles": ["head"]})
    with pytest.raises(PassError, match=r"unknown role\(s\) \['mlp'\] in include_roles"):
        AnnotatePass({"include_roles": ["mlp"]})


def test_overrides_the_model_cannot_satisfy_are_refused_before_any_annotation(analyzed):
    qg = analyzed[0].copy()
    with pytest.raises(
        PassError, match=r"overrides\[0\] selects layer\(s\) \[2, 5\] but the model has 2 layers \(0\.\.1\)"
    ):
        AnnotatePass({"overrides": [{"layers": [1, 2, 5], "weight_bits": 4}]})(qg, PassContext())
    with pytest.raises(
        PassError, match=r"overrides\[0\] \(roles \['fc1'\]\) selects no linear .* roles down, gate"
    ):
        AnnotatePass({"overrides": [{"roles": ["fc1"], "weight_bits": 4}]})(qg, PassContext())
    assert _specs(qg) == {}
    AnnotatePass(W4)(qg, PassContext())
    before = _specs(qg)
    with pytest.raises(
        PassError,
        match=r"select nothing to quantize: all 15 linears stay float \(exclude_roles \['lm_head'\], include_roles \[\]",
    ):
        AnnotatePass({"include_roles": []})(qg, PassContext())
    assert _specs(qg) == before and len(before) == 14  # a refusal leaves the earlier annotations


def test_quantize_without_annotate_is_refused_when_the_recipe_loads():
    with pytest.raises(
        RecipeError, match="'quantize' requires quantization specs annotated .* run annotate earlier"
    ):
        load_recipe(_recipe("analyze", "quantize"))


def test_an_annotation_on_the_wrong_kind_of_node_is_refused(analyzed):
    qg, _ = _annotate(analyzed, W4)
    first = next(iter(qg.info["structure"].linears))
    keys.set_(qg.node(first), keys.QSPEC, KVCacheQuantSpec())
    with pytest.raises(PassError, match="annotated kv8c static .* finds a LinearQuantSpec edge here") as exc:
        qcompile.passes.quantize.QuantizePass()(qg, PassContext())
    assert exc.value.node == first


# ---- through the pipeline ---------------------------------------------------------------------------------


def test_annotations_survive_the_equivalence_passes_and_a_reanalysis():
    """smooth, fuse_norms and rotate (R1, R2, R4) keep every annotated node and what it is: the same
    linears by role and layer, the same embedding, the same KV-cache entries — and quantize realises
    every one of them."""
    model = tiny_llama(tie_word_embeddings=False)
    annotate = {"name": "annotate", **W4, "embedding_bits": 8, "kv_cache_bits": 8}
    equivalences = [
        "calibrate",
        {"name": "smooth", "search": True},
        "fuse_norms",
        {"name": "rotate", "r1": True, "r2": True, "r4": True},
    ]
    before = qcompile.quantize(model, _recipe("analyze", annotate), calibration=CALIBRATION, progress=False)
    after = qcompile.quantize(
        model, _recipe("analyze", annotate, *equivalences, "analyze"), calibration=CALIBRATION, progress=False
    )
    assert [name for name, r in after.pipeline.results if r.changed] == ["smooth", "fuse_norms", "rotate"]

    def described(qm):
        st = qm.qgraph.info["structure"]
        kinds = {s.node: (s.role, s.layer) for s in st.linears.values()}
        kinds |= {e.node: ("embedding", None) for e in st.embeddings}
        kinds |= {a.key_source: ("key", a.layer) for a in st.attentions}
        kinds |= {a.value_source: ("value", a.layer) for a in st.attentions}
        return {name: (kinds[name], spec) for name, spec in _specs(qm.qgraph).items()}

    assert described(after) == described(before) and len(described(before)) == 14 + 1 + 4
    done = qcompile.quantize(
        model,
        _recipe("analyze", annotate, *equivalences, "quantize"),
        calibration=CALIBRATION,
        progress=False,
    )
    report = done.report("quantize")
    assert (
        report["quantized"] == 14
        and len(report["embedding"]) == 1
        and len(report["kv_cache"]["entries"]) == 4
    )
    assert set(done.qgraph.info["quantize"]) >= set(described(before))


def test_quantize_never_annotates_the_callers_graph(analyzed):
    qg = analyzed[0]
    qcompile.quantize(
        qg,
        _recipe("analyze", {"name": "annotate", **W4}, "quantize"),
        example_inputs=(analyzed[1],),
        progress=False,
    )
    assert _specs(qg) == {}
    assert not any(keys.QUANT in keys.get(n) for n in qg.graph.nodes)


def test_a_mixed_recipe_quantizes_the_selected_linears_at_8_bits_and_the_rest_at_4(analyzed):
    """v in every layer and down in the last layer at int8, every other linear at int4: the schemes on
    the graph say so, the int8 weights use the int8 grid, and they carry far less weight error than the
    same linears quantized at int4."""
    qg, ids = analyzed
    mixed = {
        "name": "annotate",
        **W4,
        "overrides": [
            {"roles": ["v"], "weight_bits": 8},
            {"roles": ["down"], "layers": [1], "weight_bits": 8},
        ],
    }
    uniform = {"name": "annotate", **W4}
    runs = {
        name: qcompile.quantize(qg, _recipe("analyze", a, "quantize"), example_inputs=(ids,), progress=False)
        for name, a in (("mixed", mixed), ("uniform", uniform))
    }
    st = runs["mixed"].qgraph.info["structure"]
    eight = {s.node for s in st.linears.values() if s.role == "v" or (s.role, s.layer) == ("down", 1)}
    assert len(eight) == st.num_layers + 1
    report = runs["mixed"].report("quantize")
    assert report["schemes"] == {"w4g16s-a16 rtn": 14 - len(eight), "w8g16s-a16 rtn": len(eight)}
    graph = runs["mixed"].qgraph
    for site in st.linears.values():
        if site.role == "lm_head":
            continue
        node = graph.node(site.node)
        assert keys.get(node)[keys.QUANT] == ("w8g16s-a16" if site.node in eight else "w4g16s-a16")
        q = graph.get_constant(node.args[1].args[0])
        assert (int(q.abs().max()) > 8) == (site.node in eight)
    w4 = {r["node"]: r["weight_sqnr_db"] for r in runs["uniform"].report("quantize")["linears"]}
    for row in report["linears"]:
        gain = row["weight_sqnr_db"] - w4[row["node"]]
        assert gain > 20 if row["node"] in eight else gain == 0, (row["node"], gain)  # ~6 dB a bit


def test_a_tied_embedding_shares_the_lm_head_table_only_on_the_same_grid(analyzed):
    qg, ids = analyzed
    base = load_recipe(_recipe("analyze", {"name": "annotate", **W4}, "quantize"))
    same = base.with_quantization(lm_head_bits=4, embedding_bits=4, head_group_size=16)
    other = load_recipe(
        _recipe(
            "analyze",
            {
                "name": "annotate",
                **W4,
                "overrides": [{"roles": ["lm_head"], "weight_bits": 4, "group_size": 16}],
                "embedding_bits": 4,
                "embedding_group_size": 32,
            },
            "quantize",
        )
    )
    shared = {}
    for name, recipe in (("same", same), ("other", other)):
        qm = qcompile.quantize(qg, recipe, example_inputs=(ids,), progress=False)
        (row,) = qm.report("quantize")["embedding"]
        shared[name] = row["shared_with_lm_head"]
        st = qm.qgraph.info["structure"]
        head_deq = qm.qgraph.node(st.lm_head).args[1]
        assert (qm.qgraph.node(st.embeddings[0].node).args[0] is head_deq) == shared[name]
    assert shared == {"same": True, "other": False}


@pytest.mark.real
def test_the_shipped_mixed_recipe_on_smollm2(smollm2_qgraph):
    """Its overrides fit SmolLM2: v in all 30 layers and layer 11's down at int8, the other 179 linears
    at int4, lm_head float (annotation only: no calibration needed)."""
    recipe = load_recipe("w4a16-smoothquant+-gptq-mixed")
    annotate = recipe.passes[recipe.pass_names().index("annotate")]
    qg = smollm2_qgraph[0].copy()
    AnalyzePass()(qg, PassContext())
    result = AnnotatePass(annotate.options)(qg, PassContext())
    assert result.report["linears"] == {"w4g128a+clip-a16 gptq": 179, "w8g128a+clip-a16 gptq": 31}
    st = qg.info["structure"]
    eight = {n for n, s in _specs(qg).items() if isinstance(s, LinearQuantSpec) and s.weight.bits == 8}
    assert {(st.linears[n].role, st.linears[n].layer) for n in eight} == {("v", i) for i in range(30)} | {
        ("down", 11)
    }
