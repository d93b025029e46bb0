"""The S2V pipeline: load the official Wan2.2 components once, then turn a job into video frames.

`S2VPipeline` subclasses the official `wan.WanS2V` so that its sizing and audio bucketing are the
official methods themselves; the pose conditioning is upstream's `load_pose_cond` math, done clip by
clip in bounded memory (`pose_latents`). Two parts are the worker's own:

* loading (`S2VPipeline.load`): the same official classes, placed on the worker's device (GPU, or
  the CPU for the tiny test checkpoint), with the T5 and VAE widths read from the checkpoint so that
  the tiny checkpoint loads through the same code as the real one;
* `generate`: the official `WanS2V.generate` computation, step for step, with three changes that do
  not touch the math: it runs on any device, it samples the fewest clips that cover the whole audio
  (the official code may stop one clip short, see `plan_clip_count`), and it reports progress and
  can be stopped between denoising steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import soundfile
import torch
from PIL import Image
from torchvision import transforms

from .checkpoint import (T5_CHECKPOINT, T5_TOKENIZER_DIR, VAE_CHECKPOINT, WAV2VEC_DIR,
                         Checkpoint)
from . import attention as dit_attention
from .dit import DiTEngine
from .job import GenerationSettings, JobInputError
from .official import import_official, install_attention, official_architecture
from .parallel import Layout
from .sampling import ClipRequest, ClipSampler, Role, reused_steps

logger = logging.getLogger(__name__)

NATIVE_FPS = 16  # Wan2.2-S2V samples video at 16 fps (config.sample_fps)
# The smallest side the model can make: the VAE's stride (8) times the DiT's patch (2). The official
# sizing gives multiples of 64, or 0 for images far wider than tall (or the reverse).
LATENT_PATCH_PIXELS = 16
FIRST_CLIP_DROPPED_FRAMES = 3  # WanS2V.generate drops the first 3 frames of clip 0 when drop_first_motion

_official = import_official()
WanS2V = _official.speech2video.WanS2V
OFFICIAL_CONFIG = _official.config


class _VideoVAE(_official.vae.Wan2_1_VAE):
    """The official Wan2.1 VAE, with inputs cast to its dtype (float32) before encoding/decoding.

    The official callers hand it bfloat16 pixels and rely on CUDA autocast(float32) inside
    `Wan2_1_VAE.encode` to cast them at the first convolution. Casting up front gives the same
    numbers (bf16 -> fp32 is exact and nothing before that convolution computes) and also works on
    the CPU, where CUDA autocast does nothing.
    """

    def encode(self, videos):
        return super().encode([u.to(self.dtype) for u in videos])

    def decode(self, zs):
        return super().decode([u.to(self.dtype) for u in zs])

    def decode_chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """`decode([z])[0]` ([3, frames, H, W]) in pieces as they are computed: the loop of the
        official `WanVAE_.decode`, one latent frame (1, then 4 video frames) at a time, each
        piece made float32 and clamped as `Wan2_1_VAE.decode` does with the whole; the pieces
        concatenated are the same tensor. Lets the MP4 encoder start before the clip is done."""
        model = self.model
        scale_mean, scale_inv_std = (s.view(1, model.z_dim, 1, 1, 1) for s in self.scale)
        model.clear_cache()
        try:
            with torch.amp.autocast("cuda", dtype=self.dtype, enabled=z.is_cuda):
                x = model.conv2(z.to(self.dtype).unsqueeze(0) / scale_inv_std + scale_mean)
            for i in range(x.shape[2]):
                with torch.amp.autocast("cuda", dtype=self.dtype, enabled=z.is_cuda):
                    model._conv_idx = [0]
                    out = model.decoder(x[:, :, i:i + 1], feat_cache=model._feat_map,
                                        feat_idx=model._conv_idx)
                yield out.float().clamp_(-1, 1).squeeze(0)
        finally:
            model.clear_cache()


# Pose frames are decoded and resized a batch at a time, so that no more than this many bytes of
# float32 source-resolution pixels are held at once (one frame when a frame alone is larger).
POSE_BATCH_BYTES = 128 * 1024 * 1024

# Runs in a child process (`pose_latents`). decord reads the frames upstream's
# read_last_n_frames(..., target_fps=16, reverse=True) samples (every round(fps / 16)-th frame from
# the first), and each batch is normalised, resized and cropped as upstream's load_pose_cond does,
# then written to stdout as float32: per clip, its frame count (8 bytes) and its frames. In a child,
# a file that crashes or hangs decord cannot take the worker with it.
# Two choices keep the child's memory flat (measured on 720p video, 176 batches): decord decodes on
# one thread, and the uint8 -> [-1, 1] step is a lookup in a table that upstream's own expression
# computed for the 256 values, instead of torch arithmetic on every frame. With decord's default
# threads, or with torch's elementwise ops on the decoded frames, its memory grew with every batch
# (to 2 GB); with both choices it stays at its start (about 0.75 GB with torch loaded). The values
# are the same: each pixel's result depends on its value only, and a decoder's output does not
# depend on its threads (tests/test_pipeline.py compares the latents with upstream's).
_POSE_FRAMES = """
import json, struct, sys
import torch
from decord import VideoReader
from torchvision import transforms
a = json.loads(sys.argv[1])
reader = VideoReader(a["path"], num_threads=1)
interval = max(1, round(reader.get_avg_fps() / a["fps"]))
indices = list(range(0, min(a["frames"] * a["clips"] * interval, len(reader)), interval))
source_height, source_width = reader[0].shape[:2]
batch = max(1, a["batch_bytes"] // (source_height * source_width * 3 * 4))
to_unit = (torch.arange(256, dtype=torch.uint8) / 255.0 * 2 - 1.0).numpy()  # upstream's expression
resize = transforms.Resize(min(a["height"], a["width"]))
crop = transforms.CenterCrop((a["height"], a["width"]))
out = sys.stdout.buffer
for r in range(a["clips"]):
    clip = indices[r * a["frames"]:(r + 1) * a["frames"]]
    out.write(struct.pack("<Q", len(clip)))
    for start in range(0, len(clip), batch):
        pixels = to_unit[reader.get_batch(clip[start:start + batch]).asnumpy()]
        frames = crop(resize(torch.from_numpy(pixels).permute(0, 3, 1, 2)))
        out.write(frames.contiguous().numpy().tobytes())
    out.flush()
"""


# Fast mode: every linear layer of the 40 blocks in FP8 with per-tensor scales (cuBLAS FP8 GEMM;
# measured faster than per-row scales at the same error, see bench/results).
FAST_MODE_FLOAT8 = "all_tensorwise"


def dit_calls_per_step(steps: int, guided: bool, step_cache: bool) -> list[int]:
    """DiT calls each denoising step makes, as `ClipSampler.sample` runs them: two with guidance (conditional
    and unconditional), one without, none on a step that reuses the previous prediction."""
    reuse = reused_steps(steps) if step_cache else frozenset()
    return [0 if i in reuse else (2 if guided else 1) for i in range(steps)]


# A DiT call's cost against its token count n: the GEMMs grow with n, attention with n squared.
# Fitted to the H100 forwards in README (2.89 s at 480p, 29,120 tokens; 7.97 s at 720p, 54,400),
# a*n + b*n^2 has a/b = 24,000 tokens: the count at which attention costs as much as the rest.
ATTENTION_BALANCE_TOKENS = 24_000


def _call_cost(tokens: int) -> float:
    return tokens + tokens * tokens / ATTENTION_BALANCE_TOKENS


@dataclass(frozen=True)
class ClipTiming:
    """One sampled clip, as the duration estimate learns from it."""

    calls: int  # DiT calls, as one process makes them (dit_calls_per_step)
    steps_s: float  # the denoising loop: the DiT calls and the solver's steps
    overhead_s: float  # the rest of the clip's sampling: its conditioning, the hand-off to ranks

    @property
    def seconds_per_call(self) -> float:
        return self.steps_s / self.calls


# A clip of fewer DiT calls than this (a warm-up step, a 1-step job) measures the calls with its
# noise: it counts only until clips of more calls have been measured at that size.
MIN_STEADY_CALLS = 4


class DiTSpeed:
    """Measured seconds per DiT call and per clip's preparation, by token count: what the
    worker's duration estimates rest on.

    Fed by the warm-up (a timed step after the compiling one) and by every clip a job samples:
    its denoising loop (`ClipSampler.last_steps_s`) over its DiT calls, and the rest of its
    sampling time (preparation, the ranks' hand-off) apart, so that a short job's fixed costs do
    not pass for slow calls. Each is the median of the `keep` most recent clips at that token
    count, the calls' over the clips of at least MIN_STEADY_CALLS calls when there are any: one
    odd job moves neither. A token count never measured is scaled from the nearest measured one
    (calls by `_call_cost`, preparation by the tokens). The input is only (tokens, timing), so a
    multi-GPU sampler feeds it the same way.
    """

    def __init__(self, keep: int = 8, sizes: int = 16) -> None:
        self.keep, self.sizes = keep, sizes
        self._clips: dict[int, list[ClipTiming]] = {}  # tokens -> recent clips, most recent last

    def record(self, tokens: int, timing: ClipTiming) -> None:
        if timing.calls <= 0:
            return
        clips = self._clips.pop(tokens, [])  # re-inserted: the most recently measured size last
        self._clips[tokens] = (clips + [timing])[-self.keep:]
        while len(self._clips) > self.sizes:
            del self._clips[next(iter(self._clips))]

    def rates(self, tokens: int) -> tuple[float, float] | None:
        """(seconds per DiT call, seconds of overhead per clip) at `tokens`; None: none yet."""
        if not self._clips:
            return None
        nearest = min(self._clips, key=lambda measured: abs(math.log(measured / tokens)))
        clips = self._clips[nearest]
        steady = [c for c in clips if c.calls >= MIN_STEADY_CALLS] or clips
        per_call = statistics.median(c.seconds_per_call for c in steady)
        overhead = statistics.median(c.overhead_s for c in clips)
        if nearest == tokens:
            return per_call, overhead
        return per_call * _call_cost(tokens) / _call_cost(nearest), overhead * tokens / nearest


@dataclass(frozen=True)
class SamplingEstimate:
    """How long a job's sampling should take on this worker, from `DiTSpeed`."""

    tokens: int  # per DiT call
    clips: int
    seconds_per_call: float
    overhead_per_clip_s: float
    calls_by_step: tuple[int, ...]  # one clip's

    @property
    def calls(self) -> int:
        """DiT calls of all clips together."""
        return self.clips * sum(self.calls_by_step)

    @property
    def seconds(self) -> float:
        return self.calls * self.seconds_per_call + self.clips * self.overhead_per_clip_s

    def remaining_s(self, clip: int, clips: int, step: int) -> float:
        """Seconds of sampling left once `step` of `clip` (both from 0) is done."""
        later_clips = clips - clip - 1
        calls_left = later_clips * sum(self.calls_by_step) + sum(self.calls_by_step[step + 1:])
        return calls_left * self.seconds_per_call + later_clips * self.overhead_per_clip_s


# on_step(clip_index, num_clips, step_index, num_steps); may raise (errors.JobStopped) to stop
# sampling after that step.
StepCallback = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class ClipPlan:
    height: int
    width: int
    num_clips: int
    frames_per_clip: int
    dropped_frames: int
    audio_seconds: float

    @property
    def native_fps(self) -> int:
        return NATIVE_FPS

    @property
    def native_frames(self) -> int:
        return self.num_clips * self.frames_per_clip - self.dropped_frames

    @property
    def video_seconds(self) -> float:
        """Length of the finished video: the audio's, unless max_clips cut it shorter."""
        return min(self.audio_seconds, self.native_frames / self.native_fps)


@dataclass
class GenerationResult:
    # [3, frames, height, width], float32 in [-1, 1], on the CPU; None when the frames went to
    # `on_frames` as they were decoded
    video: torch.Tensor | None
    plan: ClipPlan
    timings: dict[str, float] = field(default_factory=dict)


def plan_clip_count(audio_seconds: float, frames_per_clip: int, dropped_frames: int,
                    max_clips: int | None = None) -> int:
    """The fewest clips whose frames cover the audio.

    The official code takes `int(frames / frames_per_clip) + 1` clips from the audio bucketing,
    which leaves the end of the audio without video when the first clip's dropped frames push the
    audio past the last clip; the worker counts them.
    """
    needed_frames = math.ceil(audio_seconds * NATIVE_FPS - 1e-6) + dropped_frames
    clips = max(1, math.ceil(needed_frames / frames_per_clip))
    return min(clips, max_clips) if max_clips else clips


def infer_t5_architecture(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """The `umt5_xxl` builder arguments that match a T5 encoder state dict (full size: umt5-xxl)."""
    vocab_size, dim = state_dict["token_embedding.weight"].shape
    num_buckets, num_heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
    return dict(
        vocab_size=vocab_size, dim=dim,
        dim_attn=state_dict["blocks.0.attn.q.weight"].shape[0],
        dim_ffn=state_dict["blocks.0.ffn.fc1.weight"].shape[0],
        num_heads=num_heads, num_buckets=num_buckets,
        encoder_layers=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
    )


def infer_vae_width(state_dict: dict[str, torch.Tensor]) -> int:
    return state_dict["encoder.conv1.weight"].shape[0]


def install_attentions(setting: str, device: torch.device) -> str:
    """WAN_S2V_ATTENTION for both users of attention in a process: the official modules (their
    back-end's name is returned) and the worker's DiT (attention.py's kernel)."""
    backend = install_attention(setting)
    dit_attention.use_kernel(dit_attention.choose_kernel(setting, device))
    return backend


def load_noise_model(checkpoint: Checkpoint, device: torch.device,
                     dtype: torch.dtype) -> torch.nn.Module:
    """The DiT (`WanModel_S2V`) from the checkpoint's sharded safetensors, onto `device`: every
    rank loads it this way (parallel.py)."""
    model = _official.model_s2v.WanModel_S2V.from_pretrained(
        str(checkpoint.path), torch_dtype=dtype, device_map=str(device))
    return model.eval().requires_grad_(False)


def _peek_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # mmap: only the shapes are read here; the official class loads the tensors afterwards.
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


class S2VPipeline(WanS2V):
    """Wan2.2-S2V-14B resident on one device. Build with `S2VPipeline.load`."""

    def __init__(self) -> None:  # the official __init__ assumes CUDA and a full-size T5: see load()
        raise TypeError("use S2VPipeline.load(checkpoint, device)")

    @staticmethod
    def compute_dtypes(device: torch.device) -> tuple[torch.dtype, torch.dtype]:
        """(DiT dtype, T5 dtype). The official code computes in bfloat16 under CUDA autocast, with
        float32 regions marked by torch.cuda.amp.autocast; CPU autocast cannot reproduce those
        regions, so on the CPU (the tiny test checkpoint) every model computes in float32."""
        if device.type == "cuda":
            return OFFICIAL_CONFIG.param_dtype, OFFICIAL_CONFIG.t5_dtype
        return torch.float32, torch.float32

    @classmethod
    def load(cls, checkpoint: Checkpoint, device: torch.device, offload: bool = False,
             attention: str = "auto", compile_dit: bool = False,
             audio_encoder_on_cpu: bool = False) -> "S2VPipeline":
        """Load every component from a checkpoint folder (real or tiny) with the official classes."""
        config, folder = OFFICIAL_CONFIG, checkpoint.path
        param_dtype, t5_dtype = cls.compute_dtypes(device)
        resident = torch.device("cpu") if offload else device
        timings: dict[str, float] = {}

        start = time.perf_counter()
        t5_path = folder / T5_CHECKPOINT
        with official_architecture(_official.t5, "umt5_xxl",
                                   **infer_t5_architecture(_peek_state_dict(t5_path))):
            text_encoder = _official.t5.T5EncoderModel(
                text_len=config.text_len, dtype=t5_dtype, device=resident,
                checkpoint_path=str(t5_path), tokenizer_path=str(folder / T5_TOKENIZER_DIR))
        timings["text_encoder_s"] = time.perf_counter() - start

        start = time.perf_counter()
        vae_path = folder / VAE_CHECKPOINT
        with official_architecture(_official.vae, "_video_vae",
                                   dim=infer_vae_width(_peek_state_dict(vae_path))):
            vae = _VideoVAE(vae_pth=str(vae_path), device=device)
        timings["vae_s"] = time.perf_counter() - start

        start = time.perf_counter()
        noise_model = load_noise_model(checkpoint, resident, param_dtype)
        timings["dit_s"] = time.perf_counter() - start

        start = time.perf_counter()
        # The official pipeline keeps wav2vec2 on the CPU (21 s for 4.5 s of speech in the job benchmark);
        # the worker runs it on the GPU by default, in float32 without TF32 (see _encode_audio).
        audio_encoder = _official.audio_encoder.AudioEncoder(
            device="cpu" if offload or audio_encoder_on_cpu else device,
            model_id=str(folder / WAV2VEC_DIR))
        timings["audio_encoder_s"] = time.perf_counter() - start

        logger.info("pipeline loaded from %s on %s (%s)", folder, device,
                    ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        return cls.from_components(checkpoint, device, text_encoder=text_encoder, vae=vae,
                                   noise_model=noise_model, audio_encoder=audio_encoder,
                                   offload=offload, attention=attention, compile_dit=compile_dit)

    @classmethod
    def from_components(cls, checkpoint: Checkpoint, device: torch.device, *, text_encoder, vae,
                        noise_model, audio_encoder, offload: bool = False,
                        attention: str = "auto", compile_dit: bool = False) -> "S2VPipeline":
        """A pipeline around already-built official components (the loader's, or a benchmark's)."""
        self = cls.__new__(cls)
        config = OFFICIAL_CONFIG
        # Attributes WanS2V's methods read (see WanS2V.__init__).
        self.device = device
        self.config = config
        self.rank = 0
        self.sp_size = 1
        self.t5_cpu = False
        self.init_on_cpu = False
        self.num_train_timesteps = config.num_train_timesteps
        self.param_dtype = cls.compute_dtypes(device)[0]
        self.sample_neg_prompt = config.sample_neg_prompt
        self.motion_frames = config.transformer.motion_frames
        self.drop_first_motion = config.drop_first_motion
        self.fps = config.sample_fps
        self.audio_sample_m = 0
        self.offload = offload
        self.checkpoint = checkpoint
        self.attention_backend = install_attentions(attention, device)
        logger.info("DiT attention: %s", dit_attention.ATTENTION.name)
        self.text_encoder, self.vae, self.audio_encoder = text_encoder, vae, audio_encoder
        self.noise_model = noise_model.eval().requires_grad_(False)
        # torch.compile needs a GPU back-end (Triton); on the CPU the engine runs eagerly.
        self.dit = DiTEngine(self.noise_model, compile=compile_dit and device.type == "cuda")
        self.sampler = ClipSampler(self.dit, device, FAST_MODE_FLOAT8)
        self.group = None  # the other ranks, when the worker has several GPUs (parallel.py)
        self.dit_speed = DiTSpeed()
        return self

    @property
    def dit_calls(self) -> int:
        """DiT calls this process ran, all jobs together (tests and logs read it)."""
        return self.sampler.dit_calls

    def speed_unavailable(self, speed: str) -> str | None:
        """Why a job's `speed` cannot run here (None: it can). "fast" needs FP8 tensor cores
        (Ada, Hopper or newer); "fastest" also FlashAttention-3 (attention.py)."""
        if speed == "exact":
            return None
        if self.device.type != "cuda":
            return f"\"speed\": \"{speed}\" needs a GPU with FP8 tensor cores; this worker runs on the CPU"
        major, minor = torch.cuda.get_device_capability(self.device)
        if (major, minor) < (8, 9):
            return (f"\"speed\": \"{speed}\" needs FP8 tensor cores (compute capability 8.9 or "
                    f"newer); {torch.cuda.get_device_name(self.device)} has {major}.{minor}")
        if speed == "fastest" and dit_attention.ATTENTION.name != "fa3":
            return ("\"speed\": \"fastest\" needs FlashAttention-3 (a Hopper GPU with the fa3-fwd "
                    "package); use \"fast\"")
        return None

    # --- planning: everything that needs no model ------------------------------------------------

    def video_size(self, image_path: Path, resolution: str, field: str = "image") -> tuple[int, int]:
        """(height, width) of the video made from this image at `resolution`, sized the official
        way (`get_gen_size`: the image's shape through `get_size_less_than_area`).

        The shape is read from the file's header: `get_gen_size` decodes every pixel only to take
        it. Raises JobInputError when a side ends below one latent patch, which the official sizing
        does for images far wider than tall or the reverse (its fallback rounds a side down to 0).
        """
        with Image.open(image_path) as image:
            width, height = image.size
        max_area = self.checkpoint.max_area[resolution]
        video_height, video_width = self.get_size_less_than_area(height, width, target_area=max_area)
        if min(video_height, video_width) < LATENT_PATCH_PIXELS:
            shape, side = ("wide", "high") if video_height < video_width else ("tall", "wide")
            raise JobInputError(
                f"'{field}' is {width}x{height}, too {shape} for {resolution}: the model's sizing "
                f"would make the video {min(video_height, video_width)} pixels {side} (each side "
                f"needs at least {LATENT_PATCH_PIXELS}); crop the image closer to a video's shape")
        return video_height, video_width

    def plan(self, image_path: Path, audio_seconds: float, settings: GenerationSettings,
             image_field: str = "image") -> ClipPlan:
        height, width = self.video_size(image_path, settings.resolution, image_field)
        dropped = 0 if settings.init_first_frame or not self.drop_first_motion \
            else FIRST_CLIP_DROPPED_FRAMES
        clips = plan_clip_count(audio_seconds, settings.infer_frames, dropped, settings.max_clips)
        return ClipPlan(height=height, width=width, num_clips=clips,
                        frames_per_clip=settings.infer_frames, dropped_frames=dropped,
                        audio_seconds=audio_seconds)

    def _latent_frames(self, frames_per_clip: int) -> tuple[int, int]:
        """(motion latent frames, new latent frames per clip), as WanS2V.generate counts them."""
        motion = (self.motion_frames + 3) // 4
        return motion, (frames_per_clip + 3 + self.motion_frames) // 4 - motion

    def dit_tokens(self, height: int, width: int, frames_per_clip: int) -> int:
        """Tokens of the noisy latents in one DiT call: WanS2V.generate's `max_seq_len`."""
        _, lat_frames = self._latent_frames(frames_per_clip)
        return lat_frames * (height // 8) * (width // 8) // 4

    def estimate_sampling(self, plan: ClipPlan, settings: GenerationSettings) -> SamplingEstimate | None:
        """The job's sampling time from this worker's measured seconds per DiT call; None before
        any measurement (no warm-up on this device, and no job yet)."""
        tokens = self.dit_tokens(plan.height, plan.width, plan.frames_per_clip)
        rates = self.dit_speed.rates(tokens)
        if rates is None:
            return None
        by_step = dit_calls_per_step(settings.sample_steps, settings.guidance_scale > 1,
                                     settings.step_cache)
        return SamplingEstimate(tokens=tokens, clips=plan.num_clips, seconds_per_call=rates[0],
                                overhead_per_clip_s=rates[1], calls_by_step=tuple(by_step))

    def warm_up(self, resolutions: tuple[str, ...], frames_per_clip: int = 80) -> dict[str, float]:
        """One sampling step per resolution on blank inputs at its 16:9 size, so that compilation
        (and cuDNN/cuBLAS kernel selection) happens before the first job, on every rank and for
        every layout the ranks may sample in (parallel.py). Seconds per resolution."""
        import tempfile

        timings = {}
        m = self.noise_model
        with tempfile.TemporaryDirectory() as folder:
            # wav2vec2's first call on a GPU takes seconds of one-time set-up (14 s measured in a
            # first job on an H200, 0.03 s in the next): here, not in the first job.
            start = time.perf_counter()
            silence = Path(folder) / "silence.wav"
            soundfile.write(str(silence), np.zeros(16000, dtype=np.float32), 16000)
            with _without_tf32():
                self.encode_audio(str(silence), infer_frames=frames_per_clip)
            timings["audio_encoder"] = time.perf_counter() - start
            image_path = Path(folder) / "blank_16x9.png"
            Image.new("RGB", (1280, 720)).save(image_path)
            for resolution in resolutions:
                start = time.perf_counter()
                height, width = self.get_gen_size(size=None,
                                                  max_area=self.checkpoint.max_area[resolution],
                                                  ref_image_path=str(image_path), pre_video_path=None)
                lat_motion, lat_frames = self._latent_frames(frames_per_clip)
                latent = partial(torch.zeros, dtype=self.param_dtype, device=self.device)
                size = (height // 8, width // 8)
                audio_layers = m.casual_audio_encoder.weights.shape[1]
                branch = dict(
                    context=[latent(1, m.text_embedding[0].in_features)],
                    ref_latents=latent(1, 16, 1, *size), motion_latents=latent(1, 16, lat_motion, *size),
                    cond_states=latent(1, 16, lat_frames, *size),
                    audio_input=latent(1, audio_layers, m.config.audio_dim, frames_per_clip),
                    motion_frames=[self.motion_frames, lat_motion], drop_motion_frames=False)
                generator = torch.Generator(device=self.device)
                requests = [ClipRequest(
                    latents=latent(16, lat_frames, *size), generator_state=generator.get_state(),
                    solver="unipc", steps=1, shift=3.0, guidance_scale=4.5 if guided else 1.0,
                    cond=branch, uncond=branch if guided else None)
                    for guided in self._layouts_to_warm()]
                with self._on_device(m):
                    for request in requests:
                        self.sample_clip(request)
                    _wait_for_gpu(self.device)
                    timings[resolution] = time.perf_counter() - start
                    # Compiled now: the first layout once more measures a step as jobs run it,
                    # for the first job's duration estimate.
                    start = time.perf_counter()
                    self.sample_clip(requests[0])
                    _wait_for_gpu(self.device)
                    timing = self._clip_timing(time.perf_counter() - start,
                                               calls=2 if requests[0].guided else 1)
                self.dit_speed.record(self.dit_tokens(height, width, frames_per_clip), timing)
                logger.info("warm-up at %s (%dx%d): %.1f s, then %.2f s per DiT call", resolution,
                            width, height, timings[resolution], timing.seconds_per_call)
        return timings

    def layout(self, guided: bool) -> Layout:
        """How the worker's GPUs share a clip (the job result reports it)."""
        if self.group is None:
            return Layout(world_size=1, cfg_parallel=False, sequence_parallel=1)
        return self.group.layout(guided)

    def _layouts_to_warm(self) -> tuple[bool, ...]:
        """Guided or not, for each distinct way the ranks split a DiT call: alone, unguided (one
        call per step) compiles what guided does too."""
        if self.group is None or not self.group.layout(True).cfg_parallel:
            return (False,)
        return (True, False)

    def _clip_timing(self, clip_s: float, calls: int) -> ClipTiming:
        """A clip's sampling time (`clip_s`, GPU waited for) split by the sampler's loop time."""
        steps_s = min(self.sampler.last_steps_s, clip_s)
        return ClipTiming(calls=calls, steps_s=steps_s, overhead_s=clip_s - steps_s)

    def sample_clip(self, request: ClipRequest, on_step=None) -> torch.Tensor:
        """One clip's final latents: here alone, or together with the other ranks."""
        if self.group is None:
            return self.sampler.sample(request, Role(), on_step)
        return self.group.sample(self.sampler, request, on_step)

    # --- generation --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[None]:
        """With offload on, a model visits the GPU only while it is used."""
        if self.offload:
            module.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                module.cpu()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _encode_text(self, prompt: str, negative_prompt: str | None) -> tuple[list, list]:
        # Official: an empty negative prompt means the model's default one.
        negative = negative_prompt or self.sample_neg_prompt
        with torch.no_grad(), self._on_device(self.text_encoder.model):
            context = self.text_encoder([prompt], self.device)
            context_null = self.text_encoder([negative], self.device)
        return context, context_null

    def _encode_audio(self, audio_path: Path, plan: ClipPlan) -> torch.Tensor:
        # Upstream computes wav2vec2 in float32 on the CPU; on the GPU TF32 would round its
        # matmuls and convolutions to 10-bit mantissas, so it is off for this call.
        with _without_tf32():
            audio_emb, _ = self.encode_audio(str(audio_path), infer_frames=plan.frames_per_clip)
        needed = plan.num_clips * plan.frames_per_clip
        if audio_emb.shape[-1] < needed:
            # The official bucketing fills frames past the audio's end with zeros; so does this.
            pad = audio_emb.new_zeros(*audio_emb.shape[:-1], needed - audio_emb.shape[-1])
            audio_emb = torch.cat([audio_emb, pad], dim=-1)
        return audio_emb

    def _first_motion_latents(self, motion_pixels: torch.Tensor, dropped: bool) -> torch.Tensor:
        """The first clip's motion latents. When the first clip drops its motion frames (the
        default), upstream still VAE-encodes 73 blank frames whose latents nothing reads: the
        DiT drops the motion tokens and the decode starts from the reference latents, and later
        clips encode their own. Their shape is enough then (saves that encode: 1.69 s at 480p in
        the first bench/results file)."""
        if not dropped:
            return torch.stack(self.vae.encode(motion_pixels))
        frames, height, width = motion_pixels.shape[2:]
        # float32, as Wan2_1_VAE.encode returns (later clips' motion pixels take this dtype)
        return torch.zeros(1, self.vae.model.z_dim, (frames + 3) // 4, height // 8, width // 8,
                           dtype=torch.float32, device=self.vae.device)

    def reference_pixels(self, image_path: Path, size: tuple[int, int]) -> torch.Tensor:
        """The reference image as upstream's generate prepares it: resized on its short side,
        center-cropped to `size`, in [-1, 1], shape [1, 3, 1, h, w] on the VAE's device.

        Upstream goes np.array(Image.open(path).convert("RGB")) and back with Image.fromarray:
        the same pixels in three more full-size copies (about 1 GB for a 64 Mpx image); here the
        decoded image is resized directly."""
        with Image.open(image_path) as opened:
            image = opened if opened.mode == "RGB" else opened.convert("RGB")
            resized = transforms.CenterCrop(size)(transforms.Resize(min(size))(image))
        pixels = transforms.ToTensor()(resized)
        return (pixels.unsqueeze(1).unsqueeze(0) * 2 - 1.0).to(dtype=self.vae.dtype,
                                                               device=self.vae.device)

    @torch.no_grad()
    def pose_latents(self, pose_video_path: Path, plan: ClipPlan,
                     field: str = "pose_video") -> list[torch.Tensor]:
        """The official `load_pose_cond` for a pose video, in bounded memory: one latent per clip.

        Upstream decodes every sampled frame at the video's own resolution at once and turns them
        all to float32 (a 300 s 1080p pose video: tens of GB) before resizing. Each frame's
        normalisation, resize and crop depend on that frame only, so a child process
        (`_POSE_FRAMES`) does them per batch of at most POSE_BATCH_BYTES of pixels, and this
        process VAE-encodes each clip as upstream encodes its chunk, holding one clip's resized
        frames: the same latents (tests/test_pipeline.py compares them). A video decord cannot
        decode to the end is a MediaError naming `field`.
        """
        from .media import DecoderOutputEnded, DecoderPipe, MediaError

        height, width, frames_per_clip = plan.height, plan.width, plan.frames_per_clip
        arguments = json.dumps({"path": str(pose_video_path), "fps": NATIVE_FPS,
                                "frames": frames_per_clip, "clips": plan.num_clips,
                                "height": height, "width": width, "batch_bytes": POSE_BATCH_BYTES})
        process = subprocess.Popen([sys.executable, "-I", "-c", _POSE_FRAMES, arguments],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        pipe = DecoderPipe(process, field, "decode the pose frames of one clip")
        latents = []
        try:
            for _ in range(plan.num_clips):
                pipe.restart_clock()
                try:
                    count = struct.unpack("<Q", pipe.read_exact(8))[0]
                    if count > frames_per_clip:
                        raise DecoderOutputEnded()
                    frames = torch.empty(count, 3, height, width, dtype=torch.float32)
                    if count:  # a clip past the video's end has none
                        pipe.read_into(memoryview(frames.numpy()).cast("B"))
                except DecoderOutputEnded:
                    logger.info("%s: pose frames failed (%s)", field, pipe.close_for_log())
                    raise MediaError(f"'{field}' could not be decoded to the end") from None
                # Past the video's end upstream pads with -1 (black in [-1, 1]).
                padding = -torch.ones([frames_per_clip - count, 3, height, width])
                cond = torch.cat([frames, padding]).permute(1, 0, 2, 3).unsqueeze(0)
                del frames, padding
                cond = torch.cat([cond[:, :, 0:1].repeat(1, 1, 1, 1, 1), cond], dim=2)
                latents.append(torch.stack(self.vae.encode(
                    cond.to(dtype=self.param_dtype, device=self.device)))[:, :, 1:].cpu())
        finally:
            pipe.close()
        return latents

    @torch.no_grad()
    def generate(self, image_path: Path, audio_path: Path, plan: ClipPlan,
                 settings: GenerationSettings, seed: int, pose_video_path: Path | None = None,
                 on_step: StepCallback | None = None,
                 on_frames: Callable[[torch.Tensor], None] | None = None,
                 pose_video_field: str = "pose_video") -> GenerationResult:
        """The official WanS2V.generate, on any device, for `plan.num_clips` clips. on_frames:
        gets each clip's frames [3, n, H, W] as soon as they are decoded (the MP4 encoder), and
        then they are not kept."""
        timings = {"text_encoding_s": 0.0, "audio_encoding_s": 0.0, "vae_encoding_s": 0.0,
                   "sampling_s": 0.0, "decoding_s": 0.0}

        def timed(key: str):
            return _Stopwatch(timings, key, self.device)

        size = (plan.height, plan.width)
        infer_frames = plan.frames_per_clip
        with timed("audio_encoding_s"):
            audio_emb = self._encode_audio(audio_path, plan)
        with timed("text_encoding_s"):
            context, context_null = self._encode_text(settings.prompt, settings.negative_prompt)

        with timed("vae_encoding_s"):
            ref_pixel_values = self.reference_pixels(image_path, size)
            ref_latents = torch.stack(self.vae.encode(ref_pixel_values))

            motion_pixels = torch.zeros([1, 3, self.motion_frames, *size], dtype=self.param_dtype,
                                        device=self.device)
            videos_last_frames = motion_pixels.detach()
            drop_first_motion = self.drop_first_motion and not settings.init_first_frame
            if settings.init_first_frame:
                motion_pixels[:, :, -6:] = ref_pixel_values
            motion_latents = self._first_motion_latents(motion_pixels, drop_first_motion)
            # Without a pose video upstream VAE-encodes infer_frames + 1 blank frames and then
            # multiplies the latents by 0: the worker takes the zeros (saves load_pose_cond, 2.08 s in the job benchmark).
            cond = (self.pose_latents(pose_video_path, plan, pose_video_field)
                    if pose_video_path else None)

        lat_motion_frames, lat_target_frames = self._latent_frames(infer_frames)
        target_shape = [lat_target_frames, plan.height // 8, plan.width // 8]
        max_seq_len = self.dit_tokens(plan.height, plan.width, infer_frames)
        guided = settings.guidance_scale > 1
        # DiT calls per clip as one process makes them (the estimate counts them so), whatever
        # the ranks share.
        calls_per_clip = sum(dit_calls_per_step(settings.sample_steps, guided, settings.step_cache))

        clips = []
        with self._on_device(self.noise_model):
            for r in range(plan.num_clips):
                generator = torch.Generator(device=self.device)
                generator.manual_seed(seed + r)
                noise = torch.randn(16, *target_shape, dtype=self.param_dtype, device=self.device,
                                    generator=generator)
                cond_latents = (cond[r].to(dtype=self.param_dtype, device=self.device)
                                if cond is not None else torch.zeros(1, 16, *target_shape, dtype=self.param_dtype,
                                                 device=self.device))
                audio_input = audio_emb[..., r * infer_frames:(r + 1) * infer_frames]
                common = {"seq_len": max_seq_len, "cond_states": cond_latents,
                          "motion_latents": motion_latents.clone(), "ref_latents": ref_latents,
                          "motion_frames": [self.motion_frames, lat_motion_frames],
                          "drop_motion_frames": drop_first_motion and r == 0}
                arg_c = {"context": context[0:1], "audio_input": audio_input, **common}
                arg_null = {"context": context_null[0:1], "audio_input": 0.0 * audio_input, **common}
                request = ClipRequest(
                    latents=noise, generator_state=generator.get_state(), solver=settings.solver,
                    steps=settings.sample_steps, shift=settings.shift,
                    guidance_scale=settings.guidance_scale, cond=arg_c,
                    uncond=arg_null if guided else None, fast=settings.speed != "exact",
                    step_cache=settings.step_cache,
                    attention_float8=settings.speed == "fastest")

                sampled_before = timings["sampling_s"]
                with timed("sampling_s"):
                    latents = self.sample_clip(
                        request, None if on_step is None else partial(on_step, r, plan.num_clips))
                if calls_per_clip:  # the stopwatch synced at both ends of the clip
                    self.dit_speed.record(max_seq_len, self._clip_timing(
                        timings["sampling_s"] - sampled_before, calls_per_clip))

                with timed("decoding_s"):
                    first_dropped = drop_first_motion and r == 0
                    decode_latents = torch.cat([ref_latents if first_dropped else motion_latents,
                                                latents.unsqueeze(0)], dim=2)
                    # The clip's frames are the decode's last infer_frames (the first clip's first
                    # three dropped); each piece of them goes to the encoder as it is decoded.
                    total = 4 * decode_latents.shape[2] - 3
                    keep = total - infer_frames + (FIRST_CLIP_DROPPED_FRAMES if first_dropped else 0)
                    kept, decoded = [], 0
                    for piece in self.vae.decode_chunks(decode_latents[0]):
                        decoded += piece.shape[1]
                        if decoded > keep:  # the frames before `keep` are let go at once
                            frames = piece[:, max(0, piece.shape[1] - (decoded - keep)):]
                            kept.append(frames)
                            if on_frames is not None:
                                on_frames(frames)
                    image = torch.cat(kept, dim=1)[None]
                    overlap = min(self.motion_frames, image.shape[2])
                    videos_last_frames = torch.cat(
                        [videos_last_frames[:, :, overlap:], image[:, :, -overlap:]], dim=2
                    ).to(dtype=motion_latents.dtype, device=motion_latents.device)
                if on_frames is None:
                    clips.append(image.cpu())
                with timed("vae_encoding_s"):
                    if r + 1 < plan.num_clips:  # the last clip's motion latents are never used
                        motion_latents = torch.stack(self.vae.encode(videos_last_frames))

        video = torch.cat(clips, dim=2)[0] if clips else None
        return GenerationResult(video=video, plan=plan, timings=timings)


@contextlib.contextmanager
def _without_tf32() -> Iterator[None]:
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _wait_for_gpu(device: torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stopwatch:
    """Adds the wall time of a block to timings[key], waiting for queued GPU work first."""

    def __init__(self, timings: dict[str, float], key: str, device: torch.device) -> None:
        self.timings, self.key, self.device = timings, key, device

    def __enter__(self) -> None:
        _wait_for_gpu(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        _wait_for_gpu(self.device)
        self.timings[self.key] += time.perf_counter() - self.start
