"""FP8 (e4m3) linear weights and the GEMMs that use them: fast mode's matrix multiplies.

A weight [N, K] is kept in float8_e4m3fn with float32 scales, one per output row ("rowwise") or one
for the whole tensor ("tensorwise"); the activation gets scales of the same kind per call. On a GPU
the product is one FP8 tensor-core GEMM (`torch._scaled_mm`, compute capability 8.9 or newer).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT8_MAX = 448.0  # largest finite float8_e4m3fn


class Float8Weight(NamedTuple):
    """A linear weight [N, K] in float8 (e4m3) with one scale per output row ("rowwise", the
    activations then get one per token) or one for the whole tensor ("tensorwise", one for the
    whole activation too; cuBLAS's FP8 GEMM, faster, coarser)."""
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor   # float32 [1, N] (rowwise) or [1, 1] (tensorwise)

    @classmethod
    def quantize(cls, weight: torch.Tensor, rowwise: bool = True) -> "Float8Weight":
        magnitude = weight.detach().abs().float()
        amax = magnitude.amax(dim=1, keepdim=True) if rowwise else magnitude.amax().reshape(1, 1)
        scale = amax.clamp(min=1e-12) / FLOAT8_MAX
        return cls((weight.float() / scale).to(torch.float8_e4m3fn), scale.t().contiguous())

    @property
    def rowwise(self) -> bool:
        return self.scale.numel() > 1


def float8_linear(x: torch.Tensor, weight: Float8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """Fast mode: the activation scaled as the weight is (per token for per-row weights, one scale
    for per-tensor ones), one FP8 tensor-core GEMM with a bfloat16 result. Under torch.compile the
    activation scaling fuses into the kernel that produces the activation."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if weight.rowwise:
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_MAX
    else:
        scale = rows.abs().amax().clamp(min=1e-12).reshape(1, 1) / FLOAT8_MAX
    quantized = (rows / scale).to(torch.float8_e4m3fn)
    if not x.is_cuda:
        # On the CPU (the tests) torch's _scaled_mm is a reference loop, about 1000x a float32
        # GEMM (0.29 s for 1000x64x128, torch 2.14.1): the same products of the same FP8 values
        # (exact in float32), accumulated in float32 as cuBLAS does, rounded once to bfloat16.
        out = (quantized.float() * scale) @ (weight.weight.float() * weight.scale.t()).t()
        if bias is not None:
            out = out + bias.float()
        return out.to(torch.bfloat16).reshape(*x.shape[:-1], out.shape[-1])
    out = torch._scaled_mm(quantized, weight.weight.t(), scale_a=scale, scale_b=weight.scale,
                           bias=None if bias is None else bias.to(torch.bfloat16),
                           out_dtype=torch.bfloat16)
    return out.reshape(*x.shape[:-1], out.shape[-1])


_ALL_LINEARS = ("q_w", "k_w", "v_w", "o_w", "cross_q_w", "cross_o_w", "ffn1_w", "ffn2_w")
# name -> (block linears in FP8, rowwise scales): fast mode serves FAST_MODE_FLOAT8; the
# benchmarks (bench/harness.py) measure the others.
FLOAT8_LAYER_SETS = {
    "all": (_ALL_LINEARS, True),
    "all_tensorwise": (_ALL_LINEARS, False),
    "ffn": (("ffn1_w", "ffn2_w"), True),
}
# Fast mode: every linear layer of the 40 blocks in FP8 with per-tensor scales (cuBLAS FP8 GEMM;
# measured faster than per-row scales at the same error, see docs/performance.md).
FAST_MODE_FLOAT8 = "all_tensorwise"
