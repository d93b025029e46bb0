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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import comfy
from .checkpoint import T5_CHECKPOINT, Checkpoint, find_checkpoint, prepare_checkpoint
from .denoiser import Denoiser
from .device import choose_device, compute_dtypes
from .memory import GiB, MemoryPlan, model_bytes, plan_memory
from .offload import ModuleStream, embedding_on_host
from .official import import_official, official_architecture
from .parallel import ParallelGroup, resolve_world_size
from .pipeline import S2VPipeline, warm_up_dit, warm_up_speech, warm_up_vae
from .read_ahead import ReadAhead
from .settings import (AudioEncoderDevice, FolderSettings, LoggingSettings, ModelSettings,
                       ParallelSettings, SettingsError, export_to_libraries)
from .vae import VideoVAE
from .weights import (MODEL_CONSTRUCTION, infer_t5_architecture, infer_vae_width, peek_state_dict,
                      read_safetensors)

logger = logging.getLogger(__name__)

_official = import_official()
COMPILE_CACHE_SUBDIR = "torch-compile-cache"
# What CUDA itself holds outside the allocator (context, cuBLAS and cuDNN workspaces): the part of
# the card's memory that no plan may count on.
CUDA_CONTEXT_BYTES = 1 * 2**30


def start_pipeline(model: ModelSettings, parallel: ParallelSettings, folders: FolderSettings,
                   logging_settings: LoggingSettings, stages: dict[str, float] | None = None,
                   read_ahead: ReadAhead | None = None) -> S2VPipeline:
    """The worker's pipeline, loaded and warmed up, with its ranks when it has several GPUs; one
    log line says how long each stage took (`stages` may bring earlier ones, such as imports)
    and what the read-ahead (read_ahead.py, stopped here however the start-up ends) read."""
    started = time.perf_counter()
    stages = {} if stages is None else stages
    try:
        pipeline, world_size = _start(model, parallel, folders, logging_settings, stages)
    finally:
        if read_ahead is not None:
            stages.update(read_ahead.stop())
    logger.info("worker ready in %.1f s on %d %s device(s): %s", time.perf_counter() - started,
                world_size, pipeline.device.type,
                ", ".join(f"{k} {v:g}" for k, v in stages.items()))
    return pipeline


def _start(model: ModelSettings, parallel: ParallelSettings, folders: FolderSettings,
           logging_settings: LoggingSettings, stages: dict[str, float]) -> tuple[S2VPipeline, int]:
    checkpoint = _timed(stages, "checkpoint_s", _checkpoint, model, folders)
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
        # The ranks compile as they get ready; alone, rank 0 compiles while T5 still loads.
        warmup = model.warmup if compiles and group is None else ()
        pipeline = load_pipeline(checkpoint, device, model, plan, warmup, stages,
                                 warm_vae_and_speech=device.type == "cuda" and bool(model.warmup))
        if group is not None:
            _timed(stages, "ranks_s", group.wait_ready)
            pipeline.denoiser.attach(group)
            if compiles and model.warmup:
                _timed(stages, "compile_s", warm_up_dit, pipeline.denoiser, model.warmup,
                       checkpoint.max_area)
    except BaseException:
        if group is not None:
            group.close()
        raise
    return pipeline, world_size


def _checkpoint(model: ModelSettings, folders: FolderSettings) -> Checkpoint:
    checkpoint = prepare_checkpoint(find_checkpoint(model, folders), folders)
    logger.info("checkpoint: %s (%s layout)", checkpoint.path, checkpoint.layout)
    return checkpoint


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
        # The caching allocator refuses to hold more, as a smaller card's memory would (it wants
        # the device's index: "cuda" alone is refused).
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(limit / total, index)
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
                  plan: MemoryPlan | None = None, warmup: tuple[str, ...] = (),
                  stages: dict[str, float] | None = None,
                  warm_vae_and_speech: bool = False) -> S2VPipeline:
    """Every component from a checkpoint folder (real or tiny) with the official classes, placed
    as the memory plan says; the DiT warmed up for `warmup`'s resolutions, and with `warm_vae_and_speech`
    the VAE and wav2vec2.

    The four load at once, each read straight onto its device, so that the disk, not the loaders,
    sets the pace: T5, the VAE and wav2vec2 in threads, the DiT here. The one-time work runs while
    the rest still loads: the DiT's compilation as soon as the DiT is in, wav2vec2's first call (and
    the audio stack's, librosa and numba) in wav2vec2's thread, the VAE's first encode and decode
    in the VAE's. `stages` gets each part's seconds (a thread's with its warm-up)."""
    stages = {} if stages is None else stages
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="load") as pool:
        text_encoder = pool.submit(_timed, stages, "t5_s", load_t5, checkpoint, device, settings,
                                   plan is not None and plan.t5_streamed)
        vae = pool.submit(_timed, stages, "vae_s", load_vae, checkpoint.vae_file, device,
                          warm_vae_and_speech)
        audio_encoder = pool.submit(_timed, stages, "wav2vec2_s", load_warm_audio_encoder,
                                    checkpoint.wav2vec_dir, device, settings, warm_vae_and_speech)
        denoiser = _timed(stages, "dit_s", Denoiser.load, checkpoint, device, settings, plan)
        if warmup:
            _timed(stages, "compile_s", warm_up_dit, denoiser, warmup, checkpoint.max_area)
        pipeline = S2VPipeline(checkpoint, device, text_encoder=text_encoder.result(),
                               vae=vae.result(), audio_encoder=audio_encoder.result(),
                               denoiser=denoiser, offload=settings.offload, memory=plan)
    _check_loaded(pipeline)
    return pipeline


def _check_loaded(pipeline: S2VPipeline) -> None:
    """Every parameter holds values: one left on the meta device (a model built while another was
    built empty) would otherwise fail only in a job, as a client's error."""
    for part in ("text_encoder", "vae", "audio_encoder", "denoiser"):
        component = getattr(pipeline, part)
        model = getattr(component, "model", component)
        if not isinstance(model, torch.nn.Module):
            continue
        empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                 if tensor.is_meta]
        if empty:
            raise RuntimeError(f"{part} was not loaded: {len(empty)} tensor(s) without values, "
                               f"e.g. {empty[:3]}")


def _timed(stages: dict[str, float], key: str, load, *args):
    start = time.perf_counter()
    try:
        return load(*args)
    finally:
        stages[key] = round(time.perf_counter() - start, 1)


def load_t5(checkpoint: Checkpoint, device: torch.device, settings: ModelSettings,
            streamed: bool) -> object:
    """The official `T5EncoderModel` around umt5-xxl built empty and filled from the `.pth` file's
    tensors (or a ComfyUI umt5 file's, renamed and dequantized), read by several threads straight
    onto the device (the official constructor initializes 5.7 B random values first, then reads
    the file into host memory whole). Streamed (memory.py): into pinned host memory, its blocks
    visiting the GPU while they run."""
    config = _official.config
    dtype = compute_dtypes(device)[1]
    home = torch.device("cpu") if streamed or settings.offload else device
    if checkpoint.comfy is None:
        source = checkpoint.path / T5_CHECKPOINT
        state = tensors_to(peek_state_dict(source), home, dtype)
    else:
        source = checkpoint.comfy.t5
        state = comfy.t5_state_dict(source, dtype, read=lambda wanted: read_safetensors(
            [source], home, wanted=wanted))
        if home.type == "cpu" and torch.cuda.is_available():
            state = {name: tensor.pin_memory() for name, tensor in state.items()}
    with MODEL_CONSTRUCTION:  # assign registers parameters: not while the DiT is built empty
        model = _official.t5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=dtype,
                                      device="meta", **infer_t5_architecture(state))
        model.load_state_dict(state, assign=True)
    model.eval().requires_grad_(False)
    if streamed:
        stream_t5(model, device)
    encoder = _official.t5.T5EncoderModel.__new__(_official.t5.T5EncoderModel)
    # The attributes the official constructor sets (T5EncoderModel.__init__), its model ours.
    encoder.text_len, encoder.dtype, encoder.device = config.text_len, dtype, home
    encoder.checkpoint_path, encoder.tokenizer_path = str(source), str(checkpoint.t5_tokenizer_dir)
    encoder.model = model
    encoder.tokenizer = _official.t5.HuggingfaceTokenizer(
        name=encoder.tokenizer_path, seq_len=config.text_len, clean="whitespace")
    return encoder


def tensors_to(state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
               readers: int = 8) -> dict[str, torch.Tensor]:
    """A memory-mapped state dict's tensors on `device` in `dtype` (floats), copied by `readers`
    threads at once: each copy reads its part of the file (page by page) in parallel."""
    def move(item: tuple[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
        name, tensor = item
        moved = tensor.to(device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if moved.data_ptr() == tensor.data_ptr():  # still the file's pages: read them now
            moved = moved.clone()
        if device.type == "cpu" and torch.cuda.is_available():
            moved = moved.pin_memory()  # streamed from here to the GPU
        return name, moved

    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="t5-reader") as pool:
        return dict(pool.map(move, state.items()))


def load_vae(path: Path, device: torch.device, warm: bool = False) -> VideoVAE:
    """The official VAE, and with `warm` its first encode and decode done (warm_up_vae)."""
    width = infer_vae_width(peek_state_dict(path))
    with MODEL_CONSTRUCTION, official_architecture(_official.vae, "_video_vae", dim=width):
        vae = VideoVAE(vae_pth=str(path), device=device)
    if warm:
        warm_up_vae(vae)
    return vae


def load_warm_audio_encoder(folder: Path, device: torch.device, settings: ModelSettings,
                            warm: bool):
    """`folder`: wav2vec2 in transformers' layout (the official checkpoint's subfolder)."""
    """The official AudioEncoder (wav2vec2), and with `warm` its first call done: the first
    `librosa.load` compiles numba functions (15.5 s measured on the GPU machine without numba's
    cache) and wav2vec2's first GPU call sets itself up (14 s in a first job on an H200)."""
    # The official pipeline keeps wav2vec2 on the CPU (21 s for 4.5 s of speech in the job
    # benchmark); the worker runs it on the GPU by default, in float32 without TF32
    # (S2VPipeline.encode_speech).
    on_cpu = settings.offload or settings.audio_encoder_device == AudioEncoderDevice.CPU
    with MODEL_CONSTRUCTION:
        encoder = _official.audio_encoder.AudioEncoder(device="cpu" if on_cpu else device,
                                                       model_id=str(folder))
    if warm:
        warm_up_speech(encoder)
    return encoder


def stream_t5(model: torch.nn.Module, device: torch.device) -> None:
    """T5 in pinned host memory, its blocks streamed to `device` while they run (offload.py), its
    embedding table looked up in host memory; the small rest on `device`."""
    ModuleStream(list(model.blocks), device).hook()
    embedding_on_host(model.token_embedding, device)
    model.norm.to(device)
