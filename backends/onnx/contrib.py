"""ONNX Runtime contrib ops (domain ``com.microsoft``) as onnxscript ops the torch.onnx tracer can record.

onnxscript records an op through its ``onnx.defs.OpSchema``; contrib ops have none in ``onnx.defs``,
so their schemas are written out here (public ``OpSchema`` constructor, fields as ORT documents them in
``docs/ContribOperators.md``). Only the ops the exporter emits are declared.
"""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

MS_DOMAIN = "com.microsoft"
MS_OPSET = Opset(MS_DOMAIN, 1)

_OPTIONAL = OpSchema.FormalParameterOption.Optional
_FLOATS = ["tensor(float)", "tensor(float16)"]


def _param(name: str, type_str: str, optional: bool = False) -> OpSchema.FormalParameter:
    if optional:
        return OpSchema.FormalParameter(name, type_str, param_option=_OPTIONAL)
    return OpSchema.FormalParameter(name, type_str)


def _int_attr(name: str, required: bool = True) -> OpSchema.Attribute:
    return OpSchema.Attribute(name, OpSchema.AttrType.INT, required=required)


MATMUL_NBITS_SCHEMA = OpSchema(
    "MatMulNBits",
    MS_DOMAIN,
    1,
    "Y = A @ dequantize(B)ᵀ with B [N, n_blocks, blob] block-quantized along K (ORT contrib op).",
    inputs=[
        _param("A", "T1"),
        _param("B", "T2"),
        _param("scales", "T1"),
        _param("zero_points", "T3", optional=True),
        _param("g_idx", "T4", optional=True),
        _param("bias", "T1", optional=True),
    ],
    outputs=[_param("Y", "T1")],
    type_constraints=[
        ("T1", _FLOATS, "activations and scales"),
        ("T2", ["tensor(uint8)", "tensor(int32)"], "packed weights"),
        ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)"], "zero points"),
        ("T4", ["tensor(int32)"], "group index"),
    ],
    attributes=[
        _int_attr("K"),
        _int_attr("N"),
        _int_attr("bits"),
        _int_attr("block_size"),
        _int_attr("accuracy_level", required=False),
    ],
)

GATHER_BLOCK_QUANTIZED_SCHEMA = OpSchema(
    "GatherBlockQuantized",
    MS_DOMAIN,
    1,
    "Gather rows of a block-quantized table and dequantize them (ORT contrib op).",
    inputs=[
        _param("data", "T1"),
        _param("indices", "Tind"),
        _param("scales", "T2"),
        _param("zero_points", "T1", optional=True),
    ],
    outputs=[_param("output", "T2")],
    type_constraints=[
        ("T1", ["tensor(int4)", "tensor(uint4)", "tensor(uint8)"], "quantized data"),
        ("T2", _FLOATS, "scales and output"),
        ("Tind", ["tensor(int32)", "tensor(int64)"], "indices"),
    ],
    attributes=[
        _int_attr("bits", required=False),
        _int_attr("block_size", required=False),
        _int_attr("gather_axis", required=False),
        _int_attr("quantize_axis", required=False),
    ],
)

MatMulNBits = Op(MS_OPSET, "MatMulNBits", MATMUL_NBITS_SCHEMA)
GatherBlockQuantized = Op(MS_OPSET, "GatherBlockQuantized", GATHER_BLOCK_QUANTIZED_SCHEMA)

# Inputs in ORT's order (positions matter: unused optional inputs are empty names). Of ORT 1.32's
# attributes only those the exporter sets are declared.
GROUP_QUERY_ATTENTION_SCHEMA = OpSchema(
    "GroupQueryAttention",
    MS_DOMAIN,
    1,
    "Causal grouped-query attention with a BNSH KV cache; present = past ++ new (ORT contrib op).",
    inputs=[
        _param("query", "T"),  # [B, S, H·D]
        _param("key", "T", optional=True),  # [B, S, KV·D]
        _param("value", "T", optional=True),
        _param("past_key", "T_CACHE", optional=True),  # [B, KV, P, D]
        _param("past_value", "T_CACHE", optional=True),
        _param("seqlens_k", "M"),  # [B]: total length - 1
        _param("total_sequence_length", "M"),  # scalar
        _param("cos_cache", "T", optional=True),
        _param("sin_cache", "T", optional=True),
        _param("position_ids", "tensor(int64)", optional=True),
        _param("attention_bias", "T", optional=True),
        _param("head_sink", "T", optional=True),
        _param("k_scale", "T_KV_SCALE", optional=True),
        _param("v_scale", "T_KV_SCALE", optional=True),
        _param("q_norm_weight", "T", optional=True),
        _param("k_norm_weight", "T", optional=True),
        _param("query_seqlens", "M", optional=True),  # [B]: valid new tokens per row
    ],
    outputs=[_param("output", "T"), _param("present_key", "T_CACHE"), _param("present_value", "T_CACHE")],
    type_constraints=[
        ("T", _FLOATS, "activations"),
        ("T_CACHE", [*_FLOATS, "tensor(int8)"], "KV cache (int8 with k_quant_type / v_quant_type)"),
        ("T_KV_SCALE", ["tensor(float)"], "KV cache scales"),
        ("M", ["tensor(int32)"], "lengths"),
    ],
    attributes=[
        _int_attr("num_heads"),
        _int_attr("kv_num_heads"),
        OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, required=False),
        # int8 cache: "PER_CHANNEL" scales [KV·D] in k_scale / v_scale, kv_cache_bit_width 8
        OpSchema.Attribute("k_quant_type", OpSchema.AttrType.STRING, required=False),
        OpSchema.Attribute("v_quant_type", OpSchema.AttrType.STRING, required=False),
        _int_attr("kv_cache_bit_width", required=False),
    ],
)

GroupQueryAttention = Op(MS_OPSET, "GroupQueryAttention", GROUP_QUERY_ATTENTION_SCHEMA)
