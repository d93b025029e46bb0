"""The DiT block's per-step math: functional copies of the official modules' forwards.

`dit_block` is `WanS2VAttentionBlock.forward` line for line with two changes (docs/architecture.md,
"Faithfulness"): RoPE from a cached cos/sin table in real arithmetic, and the two timestep segments
selected per token with `torch.where`. `audio_injection` is `WanModel_S2V.after_transformer_block`'s
residual. They take the weights as plain tensors (`BlockWeights`, `AudioWeights`), so one compiled
graph serves every block, and a weight may be FP8 (float8.py: the type says which GEMM).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .attention import attention, self_attention
from .float8 import Float8Linear, Float8UpcastWeight, Float8Weight, float8_linear, upcast_linear


class BlockWeights(NamedTuple):
    """One `WanS2VAttentionBlock`'s parameters, as plain tensors (one compiled graph serves all)."""
    modulation: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor
    k_w: torch.Tensor
    k_b: torch.Tensor
    v_w: torch.Tensor
    v_b: torch.Tensor
    o_w: torch.Tensor
    o_b: torch.Tensor
    norm_q: torch.Tensor
    norm_k: torch.Tensor
    norm3_w: torch.Tensor | None
    norm3_b: torch.Tensor | None
    cross_q_w: torch.Tensor
    cross_q_b: torch.Tensor
    cross_o_w: torch.Tensor
    cross_o_b: torch.Tensor
    cross_norm_q: torch.Tensor
    ffn1_w: torch.Tensor
    ffn1_b: torch.Tensor
    ffn2_w: torch.Tensor
    ffn2_b: torch.Tensor

    def in_float8(self, names: tuple[str, ...], rowwise: bool) -> "BlockWeights":
        """A copy with the named linear weights multiplied by FP8 GEMMs (fast mode): bfloat16
        weights quantized (biases stay bfloat16), weights already stored in FP8 as they are."""
        def fast(weight):
            if isinstance(weight, (Float8Weight, Float8UpcastWeight)):
                return Float8Weight(*weight)
            return Float8Weight.quantize(weight, rowwise)

        return self._replace(**{name: fast(getattr(self, name)) for name in names})

    @classmethod
    def of(cls, block: torch.nn.Module) -> "BlockWeights":
        sa, ca, ffn = block.self_attn, block.cross_attn, block.ffn
        affine_norm3 = isinstance(block.norm3, torch.nn.LayerNorm) and block.norm3.weight is not None
        return cls(block.modulation, linear_weight(sa.q), sa.q.bias, linear_weight(sa.k), sa.k.bias,
                   linear_weight(sa.v), sa.v.bias, linear_weight(sa.o), sa.o.bias,
                   sa.norm_q.weight, sa.norm_k.weight,
                   block.norm3.weight if affine_norm3 else None,
                   block.norm3.bias if affine_norm3 else None,
                   linear_weight(ca.q), ca.q.bias, linear_weight(ca.o), ca.o.bias, ca.norm_q.weight,
                   linear_weight(ffn[0]), ffn[0].bias, linear_weight(ffn[2]), ffn[2].bias)


def linear_weight(linear: torch.nn.Linear):
    """What the block math multiplies by: the weight tensor, or the FP8 weight with its scale of
    a Float8Linear (its type says which GEMM, see `_linear`)."""
    return linear.stored if isinstance(linear, Float8Linear) else linear.weight


class AudioWeights(NamedTuple):
    """One audio injector's parameters used per step (its keys/values are cached per clip)."""
    q_w: torch.Tensor
    q_b: torch.Tensor
    o_w: torch.Tensor
    o_b: torch.Tensor
    norm_q: torch.Tensor


# --- the per-step math (functional copies of the official modules' forwards) -----------------------

def _linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(weight, Float8Weight):
        return float8_linear(x, weight, bias)
    if isinstance(weight, Float8UpcastWeight):
        return upcast_linear(x, weight, bias)
    # What CUDA autocast does to nn.Linear in the official code: both operands in the weight dtype.
    return F.linear(x.to(weight.dtype), weight, bias)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """wan.modules.model.WanLayerNorm without affine: float32 statistics, result in x's dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """wan.modules.model.WanRMSNorm."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def _rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of interleaved (real, imaginary) pairs, as the official `rope_apply`:
    the complex product in the table's precision, the result in float32. x: [B, S, N, D]; rope:
    [S, 1, D/2, 2] (cos, sin). Written out in real arithmetic so that torch.compile fuses it
    (Inductor has no complex numbers)."""
    pairs = x.to(rope.dtype).unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[..., 0], rope[..., 1]
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2).float()


def dit_block(x: torch.Tensor, e0: torch.Tensor, noisy: torch.Tensor, rope: torch.Tensor,
              text_k: torch.Tensor, text_v: torch.Tensor, w: BlockWeights, num_heads: int,
              eps: float) -> torch.Tensor:
    """`WanS2VAttentionBlock.forward`. x: [B, S, C] (bfloat16 into block 0, float32 after);
    e0: [B, 6, 2, C] float32 modulation for (noisy tokens, reference/motion tokens); noisy: [S, 1]
    bool; text_k/text_v: this block's cached text cross-attention keys/values."""
    batch, seq, dim = x.shape
    head_dim = dim // num_heads
    mod = w.modulation.unsqueeze(2) + e0  # float32, as under the official autocast(float32)

    def per_token(i: int) -> torch.Tensor:  # row i of the modulation, by timestep segment
        return torch.where(noisy, mod[:, i, 0:1], mod[:, i, 1:2])

    # self-attention
    h = _layer_norm(x, eps).float() * (1 + per_token(1)) + per_token(0)
    q = _rms_norm(_linear(h, w.q_w, w.q_b), w.norm_q, eps).view(batch, seq, num_heads, head_dim)
    k = _rms_norm(_linear(h, w.k_w, w.k_b), w.norm_k, eps).view(batch, seq, num_heads, head_dim)
    v = _linear(h, w.v_w, w.v_b).view(batch, seq, num_heads, head_dim)
    y = _linear(self_attention(_rope(q, rope), _rope(k, rope), v).flatten(2), w.o_w, w.o_b)
    x = x + y * per_token(2)

    # text cross-attention
    if w.norm3_w is not None:
        h = F.layer_norm(x.float(), (dim,), w.norm3_w.float(), w.norm3_b.float(), eps).type_as(x)
    else:
        h = x
    q = _rms_norm(_linear(h, w.cross_q_w, w.cross_q_b), w.cross_norm_q, eps)
    y = attention(q.view(batch, -1, num_heads, head_dim), text_k, text_v).flatten(2)
    x = x + _linear(y, w.cross_o_w, w.cross_o_b)

    # feed-forward
    h = _layer_norm(x, eps).float() * (1 + per_token(4)) + per_token(3)
    y = _linear(F.gelu(_linear(h, w.ffn1_w, w.ffn1_b), approximate="tanh"), w.ffn2_w, w.ffn2_b)
    return x + y * per_token(5)


def audio_injection(x_noisy: torch.Tensor, norm_shift: torch.Tensor | None,
                    norm_scale: torch.Tensor | None, audio_k: torch.Tensor, audio_v: torch.Tensor,
                    w: AudioWeights, num_heads: int, norm_eps: float, qk_eps: float) -> torch.Tensor:
    """`WanModel_S2V.after_transformer_block`'s residual for the noisy tokens [B, F*HW, C] of F
    whole frames: each frame's tokens attend to that frame's audio tokens (audio_k/audio_v:
    [B*F, n, N, D]). norm_scale is (1 + scale) of the AdaLayerNorm (None: the plain pre-norm)."""
    batch, seq, dim = x_noisy.shape
    head_dim = dim // num_heads
    h = F.layer_norm(x_noisy.reshape(audio_k.shape[0], -1, dim).float(), (dim,), eps=norm_eps)
    if norm_scale is not None:
        h = h * norm_scale + norm_shift
    q = _rms_norm(_linear(h, w.q_w, w.q_b), w.norm_q, qk_eps)
    y = attention(q.view(audio_k.shape[0], -1, num_heads, head_dim), audio_k, audio_v)
    return _linear(y.flatten(2), w.o_w, w.o_b).reshape(batch, seq, dim)
