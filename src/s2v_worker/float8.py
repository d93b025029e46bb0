"""FP8 (e4m3) linear weights and the GEMMs that use them: fast mode's matrix multiplies, and the
DiT's resident weights when the worker keeps them in FP8 (WAN_S2V_WEIGHTS=fp8).

A weight [N, K] is kept in float8_e4m3fn with float32 scales, one per output row ("rowwise") or one
for the whole tensor ("tensorwise"). Two ways to multiply by it:
* `Float8Weight`: the activation gets scales of the same kind per call, and the product is one FP8
  tensor-core GEMM (`torch._scaled_mm`, compute capability 8.9 or newer: Ada, Hopper);
* `Float8UpcastWeight`: the weight is dequantized to the activation's dtype for the GEMM
  (weight-only FP8: any GPU, Ampere included, at bfloat16 GEMM speed).
`Float8Linear` is an nn.Linear whose stored weight is FP8: the DiT's large layers become these when
its weights are resident in FP8, so that every caller (the engine, the per-clip preparation, the
LoRA merge) finds a Linear with FP8 data and its scale.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

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

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the FP8 values and scales stand for, [N, K] in `dtype` (computed in
        float32: FP8 values and their scales are exact there)."""
        return (self.weight.float() * self.scale.t()).to(dtype)


class Float8UpcastWeight(NamedTuple):
    """The same FP8 weight and scale, multiplied after dequantizing the weight (weight-only FP8)."""
    weight: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.scale.t()).to(dtype)


def upcast_linear(x: torch.Tensor, weight: Float8UpcastWeight,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b with W dequantized to the activation's GEMM dtype (bfloat16 on a GPU, as the
    official code's autocast computes nn.Linear; float32 on the CPU). The dequantized weight is a
    temporary of one layer."""
    dtype = torch.bfloat16 if x.is_cuda else torch.float32
    return F.linear(x.to(dtype), weight.dequantize(dtype), None if bias is None else bias.to(dtype))


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


class Float8Linear(torch.nn.Linear):
    """An nn.Linear whose weight is stored in FP8 with its scale (`scale`, a buffer), multiplied
    by FP8 GEMMs (`gemm="fp8"`) or after dequantizing (`gemm="upcast"`). Its `weight` keeps the
    FP8 values, so shape checks (the LoRA parser's) see the layer's real shape."""

    def __init__(self, stored: Float8Weight, bias: torch.Tensor | None, gemm: str) -> None:
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = stored.weight.shape
        self.weight = torch.nn.Parameter(stored.weight, requires_grad=False)
        self.register_buffer("scale", stored.scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        if gemm not in ("fp8", "upcast"):
            raise ValueError(f"gemm must be fp8 or upcast, got {gemm!r}")
        self.gemm = gemm

    @property
    def stored(self) -> Float8Weight | Float8UpcastWeight:
        """The weight as the block math takes it (dit._linear picks the GEMM by its type)."""
        kind = Float8Weight if self.gemm == "fp8" else Float8UpcastWeight
        return kind(self.weight, self.scale)

    def set_stored(self, stored: Float8Weight | Float8UpcastWeight) -> None:
        """Take new FP8 values and scale (a LoRA merge, or the restore of the base ones)."""
        self.weight.data = stored.weight.to(self.weight.device)
        self.scale = stored.scale.to(self.scale.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stored = self.stored
        if isinstance(stored, Float8Weight):
            return float8_linear(x, stored, self.bias)
        return upcast_linear(x, stored, self.bias)

    def extra_repr(self) -> str:
        rows = "rowwise" if self.scale.numel() > 1 else "tensorwise"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"float8_e4m3fn {rows}, gemm={self.gemm}")
