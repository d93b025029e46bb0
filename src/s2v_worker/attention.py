"""The attention kernels the DiT's blocks call (dit.py), chosen once when the pipeline loads.

* `sdpa`: PyTorch's scaled_dot_product_attention, which picks cuDNN's kernel on Hopper (the
  official code's own path without flash_attn) and runs anywhere, the CPU included;
* `fa3`: FlashAttention-3's forward (`fa3-fwd` from the package index: Hopper only), bfloat16 like
  the official kernel, faster than cuDNN at these sequence lengths;
* `fa3` in FP8 (`fa3_float8`), for `"speed": "fastest"` only: e4m3 inputs with the tricks that
  keep the result what it was in exact arithmetic (see `fa3_float8`).

`WAN_S2V_ATTENTION=auto` takes FlashAttention-3 on a Hopper GPU when it imports, else SDPA, and
says which in one log line. The kernels take token-major [B, L, N, D] tensors, as the official
`flash_attention` does; dit.py calls them through opaque custom ops so that torch.compile leaves
them (and the collectives of sequence parallelism) out of its graphs. With several ranks
(parallel.py), self-attention is Ulysses: an all-to-all gives each rank every token of some heads.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .float8 import FLOAT8_MAX

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# `wan.modules.attention.flash_attention` casts fp32 inputs to this before the kernel.
ATTENTION_DTYPE = torch.bfloat16
FA3_CAPABILITY = (9, 0)  # the fa3-fwd wheel's kernels are built for sm90 (H100, H200)


def sdpa_token_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch SDPA on [B, L, N, D] tensors (cuDNN's kernel on Hopper), as the official fallback
    calls it."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _fa3_function() -> Callable[..., Any]:
    from fa3_fwd_interface import flash_attn_func  # noqa: PLC0415 (optional, GPU-only package)

    return flash_attn_func


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # some builds return (out, lse)


def fa3_token_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 in bfloat16; takes and returns [B, L, N, D] as they are."""
    return _first(_fa3_function()(q, k, v))


def _per_head_scale(x: torch.Tensor) -> torch.Tensor:
    """[B, L, N, D] -> [B, N] float32: amax over tokens and channels / FLOAT8_MAX."""
    return x.abs().amax(dim=(1, 3)).float().clamp(min=1e-12) / FLOAT8_MAX


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale[:, None, :, None]).to(torch.float8_e4m3fn)


def _float8_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """e4m3 q, k, v with per-(batch, head) scales, and the per-channel factors of v.

    Two changes that leave the attention what it is in exact arithmetic, and cut what e4m3's
    three mantissa bits lose: k minus its mean over the tokens (every logit of a query moves by
    the same amount, which softmax ignores; as SageAttention smooths K), and v divided by each
    channel's largest magnitude (the output is linear in v's channels: multiplied back after)."""
    k = k.float() - k.float().mean(dim=1, keepdim=True)
    v_channel = v.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    v = v.float() / v_channel
    scales = [_per_head_scale(t) for t in (q, k, v)]
    return [_quantize(t, s) for t, s in zip((q, k, v), scales)], scales, v_channel


_float8_inputs_compiled: Callable[..., Any] | None = None


def fa3_float8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3's FP8 path on bfloat16 inputs (quantized here, in two fused kernels);
    the result in bfloat16. Coarser than bfloat16: fast mode's opt-in (`"speed": "fastest"`)."""
    global _float8_inputs_compiled
    if _float8_inputs_compiled is None:  # fuses the reductions and casts (2-3 passes, not ~10)
        _float8_inputs_compiled = torch.compile(_float8_inputs, fullgraph=True, dynamic=True)
    (q8, k8, v8), (q_scale, k_scale, v_scale), v_channel = _float8_inputs_compiled(q, k, v)
    out = _first(_fa3_function()(q8, k8, v8, q_descale=q_scale, k_descale=k_scale,
                                 v_descale=v_scale))
    return (out.float() * v_channel).to(ATTENTION_DTYPE)


KERNELS: dict[str, Kernel] = {"sdpa": sdpa_token_major, "fa3": fa3_token_major}


def fa3_unavailable(device: torch.device) -> str | None:
    """Why FlashAttention-3 cannot run here; None when it can."""
    if device.type != "cuda":
        return "not a CUDA device"
    capability = torch.cuda.get_device_capability(device)
    if capability != FA3_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} is compute capability "
                f"{capability[0]}.{capability[1]}, FlashAttention-3 needs Hopper (9.0)")
    try:
        _fa3_function()
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a mismatched build
        return f"fa3-fwd does not import ({type(exc).__name__}: {exc})"[:300]
    return None


def choose_kernel(requested: str, device: torch.device) -> str:
    """WAN_S2V_ATTENTION's choice for the DiT: 'fa3' or 'sdpa' ('flash', flash-attn 2 for the
    official modules, means SDPA here: the blocks never used flash-attn's kernel)."""
    if requested in ("sdpa", "flash"):
        return "sdpa"
    reason = fa3_unavailable(device)
    if requested == "fa3" and reason:
        raise RuntimeError(f"WAN_S2V_ATTENTION=fa3 but FlashAttention-3 cannot run here: {reason}")
    if reason:
        logger.info("attention: FlashAttention-3 not used (%s); PyTorch SDPA instead", reason)
        return "sdpa"
    return "fa3"


@dataclass(frozen=True)
class SequenceParallel:
    """This process's part of a Ulysses sequence-parallel group: the tokens are split into
    `size` equal shards (the last one padded), one per rank of `group`."""
    group: Any  # torch.distributed ProcessGroup
    rank: int   # this process's index inside the group
    size: int


class _AttentionState:
    """What the opaque attention ops call: the kernels, and, during one forward, whether it is in
    FP8 and which sequence-parallel group it belongs to, with the true (unpadded) token count.
    Read at run time inside the ops, so that none of it is baked into a compiled graph."""

    def __init__(self) -> None:
        self.name = "sdpa"
        self.kernel: Kernel = sdpa_token_major
        self.self_kernel: Kernel = sdpa_token_major  # self-attention: fa3_float8 in FP8 forwards
        self.sequence: SequenceParallel | None = None
        self.valid_tokens = 0


ATTENTION = _AttentionState()


def use_kernel(name: str) -> None:
    """Every attention of the DiT through KERNELS[name] from now on."""
    ATTENTION.name, ATTENTION.kernel, ATTENTION.self_kernel = name, KERNELS[name], KERNELS[name]


@contextlib.contextmanager
def forward_state(sequence: SequenceParallel | None, valid_tokens: int,
                  float8: bool) -> Iterator[None]:
    """For one DiT forward: its sequence-parallel group, and FP8 self-attention if asked for."""
    if float8 and ATTENTION.name != "fa3":
        raise RuntimeError("FP8 attention needs FlashAttention-3 (WAN_S2V_ATTENTION)")
    ATTENTION.sequence, ATTENTION.valid_tokens = sequence, valid_tokens
    ATTENTION.self_kernel = fa3_float8 if float8 else ATTENTION.kernel
    try:
        yield
    finally:
        ATTENTION.sequence, ATTENTION.valid_tokens = None, 0
        ATTENTION.self_kernel = ATTENTION.kernel


# Opaque ops, so that torch.compile hands the kernels the [B, L, N, D] (token-major) tensors the
# official code hands them, and keeps the collectives of sequence parallelism out of its graphs.
# (Measured at 480p with SDPA: 2.889 s per forward against 2.911 s with Inductor's own lowering.)
@torch.library.custom_op("s2v_worker::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return ATTENTION.kernel(q, k, v)


@torch.library.custom_op("s2v_worker::self_attention", mutates_args=())
def _self_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if ATTENTION.sequence is None:
        return ATTENTION.self_kernel(q, k, v)
    return ulysses_attention(q, k, v, ATTENTION.sequence, ATTENTION.valid_tokens,
                             ATTENTION.self_kernel)


def _output_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ops' shapes for torch.compile's tracing: q's, with v's channels."""
    return q.new_empty(*q.shape[:-1], v.shape[-1])


_attention_op.register_fake(_output_like)
_self_attention_op.register_fake(_output_like)


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Chunk i of x's first dimension goes to rank i of the group; chunk i of the result came from
    rank i. (`wan.distributed.util.all_to_all` does this by the size of the whole world, which is
    wrong inside the half-groups of guidance-parallel sampling.)"""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel,
                      valid_tokens: int, kernel: Kernel) -> torch.Tensor:
    """DeepSpeed-Ulysses attention, as `wan.distributed.ulysses.distributed_attention`: each rank
    holds a shard of the tokens [B, L, N, D] with every head; an all-to-all gives it every token
    for N/size heads, the kernel attends over the true tokens (the padding of the last shard is
    left out, so no mask is needed), and a second all-to-all returns its shard."""
    batch, shard_len, heads, head_dim = q.shape
    part = heads // sp.size

    def to_heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, N, D] -> [B, size * L, N / size, D]
        chunks = t.reshape(batch, shard_len, sp.size, part, head_dim).permute(2, 0, 1, 3, 4)
        gathered = _all_to_all(chunks, sp.group)  # [size (token shard), B, L, N / size, D]
        return gathered.permute(1, 0, 2, 3, 4).reshape(batch, sp.size * shard_len, part, head_dim)

    q, k, v = to_heads(q), to_heads(k), to_heads(v)
    out = kernel(q[:, :valid_tokens], k[:, :valid_tokens], v[:, :valid_tokens])
    if valid_tokens < q.shape[1]:
        out = F.pad(out, (0, 0, 0, 0, 0, q.shape[1] - valid_tokens))
    chunks = out.reshape(batch, sp.size, shard_len, part, head_dim).permute(1, 0, 2, 3, 4)
    returned = _all_to_all(chunks, sp.group)  # [size (head group), B, L, N / size, D]
    return returned.permute(1, 2, 0, 3, 4).reshape(batch, shard_len, heads, head_dim)


def _half(t: torch.Tensor) -> torch.Tensor:
    # `wan.modules.attention.flash_attention` casts fp32 inputs to bfloat16 before the kernel.
    return t if t.dtype in _HALF_DTYPES else t.to(ATTENTION_DTYPE)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, N, D] attention without masks (every S2V call attends to all keys), in bfloat16 as
    the official `flash_attention` computes it; for the text and audio cross-attentions."""
    return _attention_op(_half(q).contiguous(), _half(k).contiguous(), _half(v).contiguous())


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """As `attention`, over the tokens of every rank when the sequence is split across ranks,
    and in FP8 during a `"speed": "fastest"` forward."""
    return _self_attention_op(_half(q).contiguous(), _half(k).contiguous(), _half(v).contiguous())
