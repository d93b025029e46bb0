"""The official Wan2.2 code (`wan22` package), imported the way a FlashAttention-free worker needs it.

Three things happen here, all at run time and without editing the installed source files:

1. `wan/__init__.py` is skipped. It imports every Wan2.2 task (animate, text-to-video, ...), with
   their extra dependencies; the worker needs the S2V modules only. A bare package module whose
   `__path__` points at the installed folder lets `import wan.modules...` work without it.
2. `wan/modules/t5.py` evaluates `torch.cuda.current_device()` as a default argument when it is
   imported, which raises on a machine without a GPU. On such a machine the import runs with that
   call answered by 0; the default is never used because the worker always passes a device.
3. The modules call `flash_attention`, which requires the flash_attn package. It is replaced, in
   every module that imported it by name, by `install_attention`'s choice: flash_attn when it is
   installed (the official function itself), else `sdpa_attention`, PyTorch's
   scaled_dot_product_attention with the same semantics for the length arguments. (The DiT's own
   blocks call attention.py's kernels instead.)
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import types
import warnings
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Modules that did `from ..attention import flash_attention` (or via model.py) and so hold their own
# reference to it. `wan.modules.attention` keeps the original, used by the "flash" back-end.
_MODULES_USING_FLASH_ATTENTION = (
    "wan.modules.model",
    "wan.modules.s2v.model_s2v",
    "wan.modules.s2v.motioner",
    "wan.distributed.sequence_parallel",
)

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _register_bare_wan_package() -> None:
    existing = sys.modules.get("wan")
    if existing is not None:
        return
    spec = importlib.util.find_spec("wan")
    if spec is None or spec.origin is None:
        raise ImportError("the official Wan2.2 code is not installed: pip install --no-deps wan22")
    package = types.ModuleType("wan")
    package.__path__ = [os.path.dirname(spec.origin)]
    package.__file__ = spec.origin
    sys.modules["wan"] = package


@contextlib.contextmanager
def _cuda_current_device_answered_without_gpu() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        torch.cuda.current_device = original


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   q_lens: torch.Tensor | None = None, k_lens: torch.Tensor | None = None,
                   dropout_p: float = 0.0, softmax_scale: float | None = None,
                   q_scale: float | None = None, causal: bool = False,
                   window_size: tuple[int, int] = (-1, -1), deterministic: bool = False,
                   dtype: torch.dtype = torch.bfloat16, version: int | None = None) -> torch.Tensor:
    """`wan.modules.attention.flash_attention`'s contract on PyTorch SDPA.

    q: [B, Lq, N, D], k/v: [B, Lk, N, D]. Inputs not in fp16/bf16 are cast to `dtype` and q/k to
    v's dtype, as the official function does; the result has q's original dtype. Keys past
    `k_lens[b]` are masked out. `q_lens` must cover every query (the official varlen call
    reshapes its output to [B, Lq], so shorter query lengths are not supported there either).
    """
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("sliding-window attention is not used by Wan2.2-S2V")
    len_q, len_k, out_dtype = q.size(1), k.size(1), q.dtype

    def half(x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype in _HALF_DTYPES else x.to(dtype)

    q, k, v = half(q), half(k), half(v)
    q, k = q.to(v.dtype), k.to(v.dtype)
    if q_scale is not None:
        q = q * q_scale

    attn_mask = None
    # Wan2.2-S2V always passes full lengths (batch 1). A mask only when some key really is padding:
    # a mask would move SDPA to another kernel and change the numbers against the official path.
    # (Lengths on the GPU, as the audio cross-attention builds them, cost one sync to check.)
    if k_lens is not None and bool((k_lens < len_k).any()):
        positions = torch.arange(len_k, device=k.device)
        attn_mask = (positions[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]
    if q_lens is not None and bool((q_lens != len_q).any()):
        raise NotImplementedError("query padding (q_lens < Lq) is not supported")

    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
        dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous().to(out_dtype)


def official_fallback_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0,
                                softmax_scale=None, q_scale=None, causal=False,
                                window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                                version=None) -> torch.Tensor:
    """What the official code runs without flash_attn: `wan.modules.attention.attention`, which
    sends everything to SDPA and ignores the length arguments. The reference path of the
    benchmarks and GPU tests ("official-sdpa"); not for serving, since it drops the key masks."""
    official = importlib.import_module("wan.modules.attention")
    return official.attention(q, k, v, q_lens=q_lens, k_lens=k_lens, dropout_p=dropout_p,
                              softmax_scale=softmax_scale, q_scale=q_scale, causal=causal,
                              window_size=window_size, deterministic=deterministic, dtype=dtype)


def _choose_attention(requested: str) -> tuple[str, Callable[..., torch.Tensor]]:
    official = importlib.import_module("wan.modules.attention")
    if requested == "official-sdpa":
        return requested, official_fallback_attention
    flash_available = official.FLASH_ATTN_2_AVAILABLE or official.FLASH_ATTN_3_AVAILABLE
    if requested == "flash" and not flash_available:
        raise RuntimeError("WAN_S2V_ATTENTION=flash but the flash_attn package is not installed")
    if requested == "flash" or (requested == "auto" and flash_available):
        return "flash", official.flash_attention
    return "sdpa", sdpa_attention


def install_attention(requested: str = "auto") -> str:
    """Point every official module at the chosen attention back-end; returns its name."""
    name, function = _choose_attention(requested)
    for module_name in _MODULES_USING_FLASH_ATTENTION:
        module = importlib.import_module(module_name)
        module.flash_attention = function
    logger.info("attention back-end: %s", name)
    return name


def import_official() -> types.SimpleNamespace:
    """Import the official modules the worker uses and return them by role."""
    _register_bare_wan_package()
    # The official modules use the deprecated torch.cuda.amp API, at import and at every call; the
    # warnings say nothing a user of the worker can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"wan(\.|$)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with _cuda_current_device_answered_without_gpu():
            t5 = importlib.import_module("wan.modules.t5")
        return _import_s2v_modules(t5)


def _import_s2v_modules(t5: types.ModuleType) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        t5=t5,
        vae=importlib.import_module("wan.modules.vae2_1"),
        model_s2v=importlib.import_module("wan.modules.s2v.model_s2v"),
        audio_encoder=importlib.import_module("wan.modules.s2v.audio_encoder"),
        fm_solvers=importlib.import_module("wan.utils.fm_solvers"),
        fm_solvers_unipc=importlib.import_module("wan.utils.fm_solvers_unipc"),
        speech2video=importlib.import_module("wan.speech2video"),
        config=importlib.import_module("wan.configs.wan_s2v_14B").s2v_14B,
    )


@contextlib.contextmanager
def official_architecture(module: types.ModuleType, builder: str, **overrides) -> Iterator[None]:
    """Let an official class that hard-codes its architecture build the one a checkpoint holds.

    `T5EncoderModel` always calls `umt5_xxl()` and `Wan2_1_VAE` always calls `_video_vae()` with the
    full-size widths. Both builders accept keyword overrides; during the construction the module's
    builder is the same function with the sizes read from the checkpoint, which for the real
    checkpoint are the full-size ones.
    """
    original = getattr(module, builder)
    setattr(module, builder, partial(original, **overrides))
    try:
        yield
    finally:
        setattr(module, builder, original)
