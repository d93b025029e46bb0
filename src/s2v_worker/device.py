"""The device a worker process computes on: which one, in which dtypes, and how its time is taken.

CUDA work is queued: a stopwatch that does not wait for the GPU measures the queueing. Every timing
the worker reports or learns from (the job's `timings`, the duration estimate) waits first.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

import torch

from .settings import Device

logger = logging.getLogger(__name__)


def choose_device(requested: Device) -> torch.device:
    """WAN_S2V_DEVICE: the GPU when there is one (auto), or as asked."""
    if requested == Device.CUDA and not torch.cuda.is_available():
        raise RuntimeError("WAN_S2V_DEVICE=cuda but no CUDA device is visible")
    if requested == Device.CPU or not torch.cuda.is_available():
        if requested == Device.AUTO:
            logger.warning("no CUDA device: running on the CPU, which only suits the tiny test "
                           "checkpoint")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def compute_dtypes(device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(DiT dtype, T5 dtype). The official code computes in bfloat16 under CUDA autocast, with
    float32 regions marked by torch.cuda.amp.autocast; CPU autocast cannot reproduce those regions,
    so on the CPU (the tiny test checkpoint) every model computes in float32."""
    if device.type == "cuda":
        from .official import import_official  # the official config's dtypes (bfloat16 both)

        config = import_official().config
        return config.param_dtype, config.t5_dtype
    return torch.float32, torch.float32


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """The official code computes under CUDA autocast(bfloat16); on the CPU (tiny checkpoint)
    every model computes in float32 (see compute_dtypes)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wait_for_gpu(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_cached_memory() -> None:
    """Give the caching allocator's free blocks back (after a failed job)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Stopwatch:
    """Adds the wall time of a block to timings[key], waiting for queued GPU work first."""

    def __init__(self, timings: dict[str, float], key: str, device: torch.device) -> None:
        self.timings, self.key, self.device = timings, key, device

    def __enter__(self) -> None:
        wait_for_gpu(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        wait_for_gpu(self.device)
        self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.start


@contextlib.contextmanager
def without_tf32() -> Iterator[None]:
    """Full float32 matmuls and convolutions: TF32 rounds them to 10-bit mantissas on the GPU."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
