"""Start-up: from the environment's settings to a pipeline resident on the worker's device(s).

`start_pipeline` is what a worker does once: find the checkpoint, choose the device, start the
other ranks when there are several GPUs (they load their DiTs meanwhile), load the official
components here (`load_pipeline`), wait for the ranks, and warm up. The components are the official
classes, placed on the worker's device (GPU, or the CPU for the tiny test checkpoint), with the T5
and VAE widths read from the checkpoint so that the tiny checkpoint loads through the same code as
the real one.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .checkpoint import (T5_CHECKPOINT, T5_TOKENIZER_DIR, VAE_CHECKPOINT, WAV2VEC_DIR, Checkpoint,
                         find_checkpoint)
from .denoiser import Denoiser
from .device import choose_device, compute_dtypes
from .memory import GiB, MemoryPlan, model_bytes, plan_memory
from .offload import ModuleStream, embedding_on_host
from .official import import_official, official_architecture
from .parallel import ParallelGroup, resolve_world_size
from .pipeline import S2VPipeline
from .settings import (AudioEncoderDevice, FolderSettings, LoggingSettings, ModelSettings,
                       ParallelSettings, SettingsError, export_to_libraries)
from .vae import VideoVAE
from .weights import infer_t5_architecture, infer_vae_width, peek_state_dict

logger = logging.getLogger(__name__)

_official = import_official()
COMPILE_CACHE_SUBDIR = "torch-compile-cache"
# What CUDA itself holds outside the allocator (context, cuBLAS and cuDNN workspaces): the part of
# the card's memory that no plan may count on.
CUDA_CONTEXT_BYTES = 1 * 2**30


def start_pipeline(model: ModelSettings, parallel: ParallelSettings, folders: FolderSettings,
                   logging_settings: LoggingSettings) -> S2VPipeline:
    """The worker's pipeline, loaded and warmed up, with its ranks when it has several GPUs."""
    started = time.perf_counter()
    checkpoint = find_checkpoint(model, folders)
    device = choose_device(model.device)
    compiles = model.compile and device.type == "cuda"
    if compiles:
        configure_compile_cache(folders)  # before the ranks start: they share the cache
    world_size = resolve_world_size(parallel.world_size, device, checkpoint.dit_heads)
    if world_size > 1 and model.offload:
        raise SettingsError("WAN_S2V_OFFLOAD is for a single GPU too small for the model; "
                            "it cannot be combined with several GPUs (WAN_S2V_WORLD_SIZE)")
    plan = memory_plan(checkpoint, device, model)
    group = (ParallelGroup.launch(checkpoint, world_size, device, model, parallel,
                                  logging_settings.log_level, plan) if world_size > 1 else None)
    try:
        pipeline = load_pipeline(checkpoint, device, model, plan)
        if group is not None:
            group.wait_ready()
            pipeline.denoiser.attach(group)
        if compiles and model.warmup:
            pipeline.warm_up(model.warmup)
    except BaseException:
        if group is not None:
            group.close()
        raise
    logger.info("worker ready in %.1f s on %d %s device(s)", time.perf_counter() - started,
                world_size, device.type)
    return pipeline


def memory_plan(checkpoint: Checkpoint, device: torch.device,
                settings: ModelSettings) -> MemoryPlan | None:
    """The memory tier of this worker (memory.py), with the allocator held to
    WAN_S2V_GPU_MEMORY_GB; None on the CPU (the tiny checkpoint), where WAN_S2V_WEIGHTS alone
    applies."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    limit = total - CUDA_CONTEXT_BYTES
    if settings.gpu_memory_gb is not None:
        limit = min(limit, int(settings.gpu_memory_gb * GiB))
        # The caching allocator refuses to hold more, as a smaller card's memory would.
        torch.cuda.set_per_process_memory_fraction(limit / total, device)
    try:
        plan = plan_memory(limit, model_bytes(checkpoint), settings.weights, checkpoint.max_area)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    logger.info("%s", plan.describe())
    return plan


def configure_compile_cache(folders: FolderSettings) -> Path:
    """Point torch.compile's on-disk caches (Inductor's FX graphs and Triton kernels) at a folder
    that outlives the worker when it can (the network volume), so that the next worker there
    looks its kernels up instead of compiling them."""
    folder = folders.lasting(folders.compile_cache_dir, COMPILE_CACHE_SUBDIR)
    folder.mkdir(parents=True, exist_ok=True)
    # Read by Inductor and Triton when they first compile, in this process and the other ranks.
    export_to_libraries({"TORCHINDUCTOR_CACHE_DIR": str(folder),
                         "TRITON_CACHE_DIR": str(folder / "triton")})
    logger.info("torch.compile cache: %s", folder)
    return folder


def load_pipeline(checkpoint: Checkpoint, device: torch.device, settings: ModelSettings,
                  plan: MemoryPlan | None = None) -> S2VPipeline:
    """Every component from a checkpoint folder (real or tiny) with the official classes, placed
    as the memory plan says."""
    config, folder = _official.config, checkpoint.path
    t5_dtype = compute_dtypes(device)[1]
    resident = torch.device("cpu") if settings.offload else device
    t5_streamed = plan is not None and plan.t5_streamed
    timings: dict[str, float] = {}

    start = time.perf_counter()
    t5_path = folder / T5_CHECKPOINT
    with official_architecture(_official.t5, "umt5_xxl",
                               **infer_t5_architecture(peek_state_dict(t5_path))):
        text_encoder = _official.t5.T5EncoderModel(
            text_len=config.text_len, dtype=t5_dtype,
            device=torch.device("cpu") if t5_streamed else resident,
            checkpoint_path=str(t5_path), tokenizer_path=str(folder / T5_TOKENIZER_DIR))
    if t5_streamed:  # its blocks visit the GPU one at a time for each new prompt
        stream_t5(text_encoder.model, device)
    timings["text_encoder_s"] = time.perf_counter() - start

    start = time.perf_counter()
    vae_path = folder / VAE_CHECKPOINT
    with official_architecture(_official.vae, "_video_vae",
                               dim=infer_vae_width(peek_state_dict(vae_path))):
        vae = VideoVAE(vae_pth=str(vae_path), device=device)
    timings["vae_s"] = time.perf_counter() - start

    start = time.perf_counter()
    denoiser = Denoiser.load(checkpoint, device, settings, plan)
    timings["dit_s"] = time.perf_counter() - start

    start = time.perf_counter()
    # The official pipeline keeps wav2vec2 on the CPU (21 s for 4.5 s of speech in the job
    # benchmark); the worker runs it on the GPU by default, in float32 without TF32
    # (S2VPipeline.encode_speech).
    on_cpu = settings.offload or settings.audio_encoder_device == AudioEncoderDevice.CPU
    audio_encoder = _official.audio_encoder.AudioEncoder(
        device="cpu" if on_cpu else device, model_id=str(folder / WAV2VEC_DIR))
    timings["audio_encoder_s"] = time.perf_counter() - start

    logger.info("pipeline loaded from %s on %s (%s)", folder, device,
                ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return S2VPipeline(checkpoint, device, text_encoder=text_encoder, vae=vae,
                       audio_encoder=audio_encoder, denoiser=denoiser, offload=settings.offload,
                       memory=plan)


def stream_t5(model: torch.nn.Module, device: torch.device) -> None:
    """T5 in pinned host memory, its blocks streamed to `device` while they run (offload.py), its
    embedding table looked up in host memory; the small rest on `device`."""
    ModuleStream(list(model.blocks), device).hook()
    embedding_on_host(model.token_embedding, device)
    model.norm.to(device)
