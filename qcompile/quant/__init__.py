"""Quantizer math: tensors in, tensors out — no graph surgery (passes do that).

- :mod:`.scheme` — weight / activation quantization specs and their scheme strings;
- :mod:`.rtn` — scale rules, quantize / dequantize references, RTN with clip search, SQNR;
- :mod:`.gptq` — GPTQ (Frantar et al. 2022) on a calibrated XᵀX;
- :mod:`.packing` — the packed weight layouts the folded ops read (MatMulNBits' int4, blocked int8);
- :mod:`.calibration` — observers and the calibration run over a QGraph;
- :mod:`.smoothing` — SmoothQuant / SmoothQuant+ / QQQ scales and their searches;
- :mod:`.hadamard`, :mod:`.hadamard_k`, :mod:`.rotation` — Hadamard matrices of every size K·2^m and
  the rotation choices of QuaRot / SpinQuant.
"""
