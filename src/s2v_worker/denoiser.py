"""The DiT and everything that serves it, owned in one place: `Denoiser`.

A Denoiser holds the official `WanModel_S2V` (its weights), the engine that runs it (dit.py,
compiled on a GPU), the sampler that denoises a clip with it (sampling.py), the LoRA set merged
into its weights (lora_merge.py), the FP8 copies fast mode derives from them, the measured speed
the duration estimates rest on (estimate.py) and, on a worker with several GPUs, the group of rank
processes that sample each clip with it (parallel.py). Every process of a worker builds its DiT
with the same `Denoiser.load`; rank 0's then `attach`es the group. The pipeline and the runner ask
it for a clip, a LoRA set or a speed, and never reach into its parts.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Protocol, Sequence

import torch

from . import attention, weights
from .checkpoint import Checkpoint
from .device import compute_dtypes, release_cached_memory, wait_for_gpu
from .dit import DiTEngine
from .estimate import ClipTiming, DiTSpeed, SamplingEstimate, dit_calls_per_step
from .float8 import FAST_MODE_FLOAT8
from .lora import ResolvedLora
from .lora_merge import LoraManager, LoraSet, spare_gpu_bytes
from .memory import MemoryPlan
from .official import install_attention
from .sampling import (ALONE, ClipRequest, ClipSampler, Layout, Role, StepCallback)
from .settings import Attention, ModelSettings

logger = logging.getLogger(__name__)


class RankGroup(Protocol):
    """What the Denoiser asks of the other ranks (parallel.ParallelGroup)."""

    def layout(self, guided: bool) -> Layout: ...

    def sample(self, sampler: ClipSampler, request: ClipRequest,
               on_step: StepCallback | None = None) -> torch.Tensor: ...

    def set_loras(self, loras: Sequence[ResolvedLora]) -> None: ...

    def release(self) -> None: ...

    def check(self) -> None: ...


def float8_gemm(device: torch.device) -> str:
    """How FP8-stored weights are multiplied here: FP8 GEMMs where the GPU has FP8 tensor cores
    (compute capability 8.9: Ada, Hopper, newer), else dequantized to bfloat16 (Ampere; and the
    CPU, for the tests)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return "fp8"
    return "upcast"


def install_attentions(setting: Attention, device: torch.device) -> str:
    """WAN_S2V_ATTENTION for both users of attention in a process: the official modules (their
    back-end's name is returned) and the DiT's blocks (attention.py's kernel)."""
    backend = install_attention(setting)
    attention.use_kernel(attention.choose_kernel(setting, device))
    return backend


class Denoiser:
    """The resident DiT of one process. Build with `Denoiser.load`."""

    def __init__(self, model: torch.nn.Module, device: torch.device, *, compile: bool = False,
                 offload: bool = False, float8_layers: str = FAST_MODE_FLOAT8,
                 weights: str = "bf16", memory: MemoryPlan | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.device, self.offload = device, offload
        self.weights = weights  # "bf16" or "fp8": how the resident weights are kept
        # torch.compile needs a GPU back-end (Triton); on the CPU the engine runs eagerly.
        self.engine = DiTEngine(self.model, compile=compile and device.type == "cuda")
        self.sampler = ClipSampler(self.engine, device, float8_layers)
        # Fast mode's FP8 copies are quantized from the weights a LoRA change replaces.
        self.loras = LoraManager(self.model, on_change=lambda: self.engine.forget_float8(),
                                 spare=memory.spare_bytes if memory is not None else spare_gpu_bytes)
        self.speed = DiTSpeed()
        self.group: RankGroup | None = None

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, settings: ModelSettings,
             plan: MemoryPlan | None = None) -> "Denoiser":
        """The DiT from the checkpoint's sharded safetensors onto `device` (the CPU with offload),
        in the weights' format and placement the memory plan says, with the attention kernels
        WAN_S2V_ATTENTION asks for: every rank loads it this way."""
        backend = install_attentions(settings.attention, device)
        logger.info("attention: official modules %s, DiT %s", backend, attention.ATTENTION.name)
        resident = torch.device("cpu") if settings.offload else device
        fp8 = plan.weights == "fp8" if plan is not None else settings.weights == "fp8"
        float8 = weights.Float8Recipe(rowwise=True, gemm=float8_gemm(device)) if fp8 else None
        model = weights.load_dit(checkpoint, resident, compute_dtypes(device)[0], float8)
        denoiser = cls(model, device, compile=settings.compile, offload=settings.offload,
                       weights="fp8" if fp8 else "bf16", memory=plan)
        if plan is not None and plan.streamed_blocks:
            count = len(model.blocks)
            per_block = denoiser.engine.stream_blocks(
                list(range(count - plan.streamed_blocks, count)), device)
            logger.info("DiT: the last %d of %d blocks streamed from pinned host memory (%.2f GiB "
                        "each)", plan.streamed_blocks, count, per_block / 2**30)
        logger.info("DiT weights: %s%s (%.1f GiB)", denoiser.weights,
                    f", {float8.gemm} GEMMs" if float8 else "",
                    weights.dit_memory_bytes(model) / 2**30)
        return denoiser

    def attach(self, group: RankGroup) -> None:
        """The other ranks, started and ready: from now on every clip is sampled by all."""
        self.group = group

    # --- what a job may ask --------------------------------------------------------------------

    def speed_unavailable(self, speed: str) -> str | None:
        """Why a job's `speed` cannot run here (None: it can). "fast" needs FP8 tensor cores
        (Ada, Hopper or newer); "fastest" also FlashAttention-3 (attention.py)."""
        if speed == "exact":
            return None
        if self.device.type != "cuda":
            return (f"\"speed\": \"{speed}\" needs a GPU with FP8 tensor cores; this worker runs "
                    "on the CPU")
        major, minor = torch.cuda.get_device_capability(self.device)
        if (major, minor) < (8, 9):
            return (f"\"speed\": \"{speed}\" needs FP8 tensor cores (compute capability 8.9 or "
                    f"newer); {torch.cuda.get_device_name(self.device)} has {major}.{minor}")
        if speed == "fastest" and attention.ATTENTION.name != "fa3":
            return ("\"speed\": \"fastest\" needs FlashAttention-3 (a Hopper GPU with the "
                    "fa3-fwd package); use \"fast\"")
        return None

    def layout(self, guided: bool) -> Layout:
        """How the worker's GPUs share a clip (the job result reports it)."""
        return ALONE if self.group is None else self.group.layout(guided)

    def load_loras(self, loras: Sequence[ResolvedLora]) -> LoraSet | None:
        """Parse and check a job's LoRA set without changing a weight; None: merged already."""
        return self.loras.load(loras)

    def merge_loras(self, loras: LoraSet | None) -> bool:
        """Make a loaded set the merged one, here and on every rank; False: nothing to do."""
        if not self.loras.merge(loras):
            return False
        if self.group is not None:
            self.group.set_loras([lora for lora, _ in loras.parsed])  # every rank merges it too
        return True

    def use_loras(self, loras: Sequence[ResolvedLora]) -> bool:
        """`load_loras`, then `merge_loras` (a rank, told the set rank 0 checked)."""
        return self.merge_loras(self.load_loras(loras))

    @property
    def lora_warnings(self) -> tuple[str, ...]:
        """The merged set's skipped keys, one line per LoRA, for the job result."""
        return self.loras.warnings

    def estimate(self, tokens: int, clips: int, steps: int, guided: bool,
                 step_cache: bool) -> SamplingEstimate | None:
        """A job's sampling time from this worker's measured speed; None before any
        measurement (no warm-up on this device, and no job yet)."""
        rates = self.speed.rates(tokens)
        if rates is None:
            return None
        return SamplingEstimate(tokens=tokens, clips=clips, seconds_per_call=rates[0],
                                overhead_per_clip_s=rates[1],
                                calls_by_step=tuple(dit_calls_per_step(steps, guided, step_cache)))

    # --- sampling ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """With offload, the DiT visits the GPU while the job's clips are sampled."""
        if self.offload:
            self.model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                self.model.cpu()
                release_cached_memory()

    def sample(self, request: ClipRequest, on_step: StepCallback | None = None,
               role: Role | None = None) -> torch.Tensor:
        """One clip's final latents. role: this process's share of a clip the group samples (a
        rank other than 0); else the whole clip, here alone or with the other ranks, timed for
        the duration estimate."""
        if role is not None:
            return self.sampler.sample(request, role, on_step)
        return self._sample(request, on_step, measure=True)

    def _sample(self, request: ClipRequest, on_step: StepCallback | None,
                measure: bool) -> torch.Tensor:
        wait_for_gpu(self.device)
        start = time.perf_counter()
        if self.group is None:
            latents = self.sampler.sample(request, Role(), on_step)
        else:
            latents = self.group.sample(self.sampler, request, on_step)
        wait_for_gpu(self.device)
        calls = sum(dit_calls_per_step(request.steps, request.guided, request.step_cache))
        if measure and calls:
            clip_s = time.perf_counter() - start
            steps_s = min(self.sampler.last_steps_s, clip_s)
            self.speed.record(request_tokens(request),
                              ClipTiming(calls=calls, steps_s=steps_s, overhead_s=clip_s - steps_s))
        return latents

    @property
    def compiled_graphs(self) -> int:
        """Graphs torch.compile has made in this process so far (the warm-up's, and any a job
        made: one-time work it paid for)."""
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    @property
    def dit_calls(self) -> int:
        """DiT calls this process ran, all jobs together (tests and logs read it)."""
        return self.sampler.dit_calls

    def check_ranks(self) -> None:
        """Raise parallel.RankFailure when the ranks broke in an earlier job (every later job of
        this worker fails so, and RunPod replaces it)."""
        if self.group is not None:
            self.group.check()

    def release(self) -> None:
        """Free cached GPU memory here and on every rank (after a failed job)."""
        release_cached_memory()
        if self.group is not None:
            self.group.release()

    # --- warm-up -------------------------------------------------------------------------------

    def warm_up(self, size: tuple[int, int], frames_per_clip: int, motion_frames: int,
                latent_frames: tuple[int, int]) -> tuple[float, float]:
        """One sampling step on blank inputs at `size` (height, width), in every way the ranks
        split a DiT call, so that compilation (and cuDNN/cuBLAS kernel selection) happens before
        the first job; then one more, timed, for the first job's duration estimate. Returns
        (seconds of the first steps, seconds per DiT call of the timed one)."""
        m = self.model
        lat_motion, lat_frames = latent_frames
        latent_size = (size[0] // 8, size[1] // 8)

        def latent(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=compute_dtypes(self.device)[0], device=self.device)

        branch: dict[str, Any] = dict(
            context=[latent(1, m.text_embedding[0].in_features)],
            ref_latents=latent(1, 16, 1, *latent_size),
            motion_latents=latent(1, 16, lat_motion, *latent_size),
            cond_states=latent(1, 16, lat_frames, *latent_size),
            audio_input=latent(1, m.casual_audio_encoder.weights.shape[1], m.config.audio_dim,
                               frames_per_clip),
            motion_frames=[motion_frames, lat_motion], drop_motion_frames=False)
        generator = torch.Generator(device=self.device)
        requests = [ClipRequest(
            latents=latent(16, lat_frames, *latent_size), generator_state=generator.get_state(),
            solver="unipc", steps=1, shift=3.0, guidance_scale=4.5 if guided else 1.0,
            cond=branch, uncond=branch if guided else None)
            for guided in self._layouts_to_warm()]
        with self.on_device():
            start = time.perf_counter()
            for request in requests:
                self._sample(request, None, measure=False)
            compiled_s = time.perf_counter() - start
            # Compiled now: the first layout once more measures a step as jobs run it.
            self._sample(requests[0], None, measure=True)
        return compiled_s, self.speed.rates(request_tokens(requests[0]))[0]

    def _layouts_to_warm(self) -> tuple[bool, ...]:
        """Guided or not, for each distinct way the ranks split a DiT call: alone, unguided (one
        call per step) compiles what guided does too."""
        if self.group is None or not self.group.layout(True).cfg_parallel:
            return (False,)
        return (True, False)


def request_tokens(request: ClipRequest) -> int:
    """The DiT tokens of one call of the clip: latent frames x (H/2) x (W/2) patches."""
    frames, height, width = request.latents.shape[1:]
    return frames * height * width // 4
