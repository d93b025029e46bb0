"""The S2V pipeline: a planned job's inputs in, its video frames out, clip by clip.

`S2VPipeline.generate` is the official `WanS2V.generate` computation, step for step, in named
phases as diffusers pipelines read: `encode_inputs` (speech through wav2vec2, prompts through T5,
the reference image and pose video through the VAE), then per clip `sample_clip` (the Denoiser
denoises the clip's latents, with the other ranks when there are any) and `decode_clip` (the VAE
decodes them into frames, handed to the MP4 encoder as they come), and the next clip's motion
context. Three changes that do not touch the math: it runs on any device, it samples the fewest
clips that cover the whole audio (planning.plan_clip_count), and it reports progress and can be
stopped between denoising steps. Loading is loading.py's.

`S2VPipeline` subclasses the official `wan.WanS2V` so that the speech encoding is the official
method itself (tests/test_official_contract.py keeps that inheritance honest).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import OrderedDict
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import soundfile
import torch
from PIL import Image
from torchvision import transforms

from .checkpoint import Checkpoint
from .denoiser import Denoiser
from .device import Stopwatch, compute_dtypes, release_cached_memory, without_tf32
from .job import GenerationSettings
from .memory import MemoryPlan
from .official import import_official
from .planning import (FIRST_CLIP_DROPPED_FRAMES, MOTION_FRAMES, WARM_UP_IMAGE_SIZE, ClipPlan,
                       latent_frames, video_size)
from .pose import pose_latents
from .sampling import ClipRequest

logger = logging.getLogger(__name__)

_official = import_official()
WanS2V = _official.speech2video.WanS2V
OFFICIAL_CONFIG = _official.config

# on_step(clip_index, num_clips, step_index, num_steps): the job's progress; may raise
# (errors.JobStopped) to stop sampling after that step.
ProgressCallback = Callable[[int, int, int, int], None]
# on_frames(frames [3, n, H, W] in [-1, 1]): the next decoded frames of the video, in order.
FramesCallback = Callable[[torch.Tensor], None]
# T5 embeddings kept, each its prompt's tokens x 4096 bfloat16 values (8 KiB a token, at most 512).
TEXT_CACHE_ENTRIES = 64


@dataclass
class EncodedInputs:
    """What the clips are sampled from: `encode_inputs`' result."""

    audio: torch.Tensor  # wav2vec2 features of every clip's frames, zero-padded past the audio
    context: list[torch.Tensor]  # T5 embedding of the prompt
    context_null: list[torch.Tensor]  # and of the negative prompt
    ref_latents: torch.Tensor  # the reference image's latents
    motion_latents: torch.Tensor  # the first clip's motion context
    pose: list[torch.Tensor] | None  # per clip, from the pose video
    drop_first_motion: bool  # the first clip starts without motion frames (and drops 3 frames)


class S2VPipeline(WanS2V):
    """Wan2.2-S2V-14B resident on one device. Built by loading.load_pipeline."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device, *, text_encoder, vae,
                 audio_encoder, denoiser: Denoiser, offload: bool = False,
                 memory: MemoryPlan | None = None) -> None:
        # Not the official __init__, which assumes CUDA and a full-size T5: the components come
        # loaded. These are the attributes WanS2V's methods read (see WanS2V.__init__).
        config = OFFICIAL_CONFIG
        self.device = device
        self.config = config
        self.rank = 0
        self.sp_size = 1
        self.t5_cpu = False
        self.init_on_cpu = False
        self.num_train_timesteps = config.num_train_timesteps
        self.param_dtype = compute_dtypes(device)[0]
        self.sample_neg_prompt = config.sample_neg_prompt
        self.motion_frames = MOTION_FRAMES
        self.fps = config.sample_fps
        self.audio_sample_m = 0
        self.offload = offload
        self.checkpoint = checkpoint
        self.text_encoder, self.vae, self.audio_encoder = text_encoder, vae, audio_encoder
        self.denoiser = denoiser
        self.memory = memory  # the memory tier (memory.py); None: no limit is planned
        # T5's output per text, most recently used last: a repeated prompt (and the default
        # negative prompt of every job) costs no T5 call, which streaming would make slow.
        self._text_cache: OrderedDict[str, list[torch.Tensor]] = OrderedDict()

    # --- phase 1: the inputs, encoded --------------------------------------------------------------

    @torch.no_grad()
    def encode_inputs(self, image_path: Path, audio_path: Path, plan: ClipPlan,
                      settings: GenerationSettings, pose_video_path: Path | None,
                      pose_video_field: str, timings: dict[str, float]) -> EncodedInputs:
        size = (plan.height, plan.width)
        with self._timed(timings, "audio_encoding_s"):
            audio = self.encode_speech(audio_path, plan)
        with self._timed(timings, "text_encoding_s"):
            context, context_null = self.encode_text(settings.prompt, settings.negative_prompt)
        with self._timed(timings, "vae_encoding_s"):
            ref_pixels = self.reference_pixels(image_path, size)
            ref_latents = torch.stack(self.vae.encode(ref_pixels))
            motion_pixels = torch.zeros([1, 3, MOTION_FRAMES, *size], dtype=self.param_dtype,
                                        device=self.device)
            drop_first_motion = plan.dropped_frames > 0
            if settings.init_first_frame:
                motion_pixels[:, :, -6:] = ref_pixels
            motion_latents = self.first_motion_latents(motion_pixels, drop_first_motion)
            # Without a pose video upstream VAE-encodes infer_frames + 1 blank frames and then
            # multiplies the latents by 0: the worker takes the zeros (saves load_pose_cond, 2.08 s
            # in the job benchmark).
            pose = (pose_latents(pose_video_path, plan, self.vae, self.param_dtype,
                                 pose_video_field) if pose_video_path else None)
        return EncodedInputs(audio=audio, context=context, context_null=context_null,
                             ref_latents=ref_latents, motion_latents=motion_latents, pose=pose,
                             drop_first_motion=drop_first_motion)

    def encode_text(self, prompt: str, negative_prompt: str | None) -> tuple[list, list]:
        # Official: an empty negative prompt means the model's default one.
        negative = negative_prompt or self.sample_neg_prompt
        return self._encode_one_text(prompt), self._encode_one_text(negative)

    def _encode_one_text(self, text: str) -> list[torch.Tensor]:
        """T5's embedding of `text` (the official call, one text at a time as upstream encodes
        the prompt and the negative prompt), from the cache when it was encoded before."""
        if text in self._text_cache:
            self._text_cache.move_to_end(text)
            return self._text_cache[text]
        with torch.no_grad(), self._text_encoder_on_device():
            context = self.text_encoder([text], self.device)
        # Copies: T5 returns views of its whole 512-token output, which would all stay alive.
        context = [embedding.clone() for embedding in context]
        self._text_cache[text] = context
        while len(self._text_cache) > TEXT_CACHE_ENTRIES:
            self._text_cache.popitem(last=False)
        return context

    def encode_speech(self, audio_path: Path, plan: ClipPlan) -> torch.Tensor:
        # Upstream computes wav2vec2 in float32 on the CPU; on the GPU TF32 would round its
        # matmuls and convolutions to 10-bit mantissas, so it is off for this call.
        with without_tf32():
            audio_emb, _ = self.encode_audio(str(audio_path), infer_frames=plan.frames_per_clip)
        needed = plan.num_clips * plan.frames_per_clip
        if audio_emb.shape[-1] < needed:
            # The official bucketing fills frames past the audio's end with zeros; so does this.
            pad = audio_emb.new_zeros(*audio_emb.shape[:-1], needed - audio_emb.shape[-1])
            audio_emb = torch.cat([audio_emb, pad], dim=-1)
        return audio_emb

    def first_motion_latents(self, motion_pixels: torch.Tensor, dropped: bool) -> torch.Tensor:
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

    # --- phases 2 and 3, per clip: sample, decode ----------------------------------------------

    @torch.no_grad()
    def generate(self, image_path: Path, audio_path: Path, plan: ClipPlan,
                 settings: GenerationSettings, seed: int, on_frames: FramesCallback,
                 pose_video_path: Path | None = None, on_step: ProgressCallback | None = None,
                 pose_video_field: str = "pose_video") -> dict[str, float]:
        """The official WanS2V.generate, on any device, for `plan.num_clips` clips: each clip's
        frames [3, n, H, W] go to `on_frames` as soon as they are decoded (the MP4 encoder).
        Returns the seconds each phase took."""
        timings = {"text_encoding_s": 0.0, "audio_encoding_s": 0.0, "vae_encoding_s": 0.0,
                   "sampling_s": 0.0, "decoding_s": 0.0}
        inputs = self.encode_inputs(image_path, audio_path, plan, settings, pose_video_path,
                                    pose_video_field, timings)
        motion_latents = inputs.motion_latents
        last_frames = torch.zeros([1, 3, MOTION_FRAMES, plan.height, plan.width],
                                  dtype=self.param_dtype, device=self.device)
        with self.denoiser.on_device():
            for clip in range(plan.num_clips):
                with self._timed(timings, "sampling_s"):
                    latents = self.sample_clip(clip, inputs, motion_latents, plan, settings, seed,
                                               on_step)
                with self._timed(timings, "decoding_s"):
                    start = (inputs.ref_latents if inputs.drop_first_motion and clip == 0
                             else motion_latents)
                    frames = self.decode_clip(start, latents, plan, clip, on_frames)
                    # The next clip's motion context: the last MOTION_FRAMES frames so far.
                    overlap = min(MOTION_FRAMES, frames.shape[2])
                    last_frames = torch.cat([last_frames[:, :, overlap:], frames[:, :, -overlap:]],
                                            dim=2).to(dtype=motion_latents.dtype,
                                                      device=motion_latents.device)
                with self._timed(timings, "vae_encoding_s"):
                    if clip + 1 < plan.num_clips:  # the last clip's motion latents are never used
                        motion_latents = torch.stack(self.vae.encode(last_frames))
        return timings

    def sample_clip(self, clip: int, inputs: EncodedInputs, motion_latents: torch.Tensor,
                    plan: ClipPlan, settings: GenerationSettings, seed: int,
                    on_step: ProgressCallback | None) -> torch.Tensor:
        """Clip `clip`'s final latents [16, F, H/8, W/8]: its noise (seed + clip, as upstream),
        its slice of the speech, and both guidance branches' DiT arguments, denoised."""
        lat_motion_frames, lat_target_frames = latent_frames(plan.frames_per_clip)
        target_shape = [lat_target_frames, plan.height // 8, plan.width // 8]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed + clip)
        noise = torch.randn(16, *target_shape, dtype=self.param_dtype, device=self.device,
                            generator=generator)
        cond_latents = (inputs.pose[clip].to(dtype=self.param_dtype, device=self.device)
                        if inputs.pose is not None else
                        torch.zeros(1, 16, *target_shape, dtype=self.param_dtype,
                                    device=self.device))
        frames = plan.frames_per_clip
        audio_input = inputs.audio[..., clip * frames:(clip + 1) * frames]
        common = {"seq_len": plan.dit_tokens, "cond_states": cond_latents,
                  "motion_latents": motion_latents.clone(), "ref_latents": inputs.ref_latents,
                  "motion_frames": [MOTION_FRAMES, lat_motion_frames],
                  "drop_motion_frames": inputs.drop_first_motion and clip == 0}
        guided = settings.guidance_scale > 1
        request = ClipRequest(
            latents=noise, generator_state=generator.get_state(), solver=settings.solver,
            steps=settings.sample_steps, shift=settings.shift,
            guidance_scale=settings.guidance_scale,
            cond={"context": inputs.context[0:1], "audio_input": audio_input, **common},
            uncond=({"context": inputs.context_null[0:1], "audio_input": 0.0 * audio_input,
                     **common} if guided else None),
            fast=settings.speed != "exact", step_cache=settings.step_cache,
            float8_attention=settings.speed == "fastest")
        return self.denoiser.sample(
            request, None if on_step is None else partial(on_step, clip, plan.num_clips))

    def decode_clip(self, start: torch.Tensor, latents: torch.Tensor, plan: ClipPlan, clip: int,
                    on_frames: FramesCallback) -> torch.Tensor:
        """The clip's frames [1, 3, n, H, W]: the decode of its latents after `start` (the
        previous motion latents, or the reference image's for a first clip that drops its motion
        frames), of which the last frames_per_clip are the clip's (the first clip's first three
        dropped). Each piece goes to `on_frames` as it is decoded."""
        decode_latents = torch.cat([start, latents.unsqueeze(0)], dim=2)
        total = 4 * decode_latents.shape[2] - 3
        keep_from = total - plan.frames_per_clip + (FIRST_CLIP_DROPPED_FRAMES
                                                    if clip == 0 and plan.dropped_frames else 0)
        kept, decoded = [], 0
        for piece in self.vae.decode_chunks(decode_latents[0]):
            decoded += piece.shape[1]
            if decoded > keep_from:  # the frames before `keep_from` are let go at once
                frames = piece[:, max(0, piece.shape[1] - (decoded - keep_from)):]
                kept.append(frames)
                on_frames(frames)
        return torch.cat(kept, dim=1)[None]

    # --- warm-up -------------------------------------------------------------------------------

    def warm_up(self, resolutions: tuple[str, ...], frames_per_clip: int = 80) -> dict[str, float]:
        """Before the first job: wav2vec2's one-time set-up, and one sampling step per resolution
        (warm_up_speech, warm_up_dit). Seconds per part."""
        return {"audio_encoder": warm_up_speech(self.audio_encoder),
                **warm_up_dit(self.denoiser, resolutions, self.checkpoint.max_area,
                              frames_per_clip)}

    # --- helpers -------------------------------------------------------------------------------

    def _timed(self, timings: dict[str, float], key: str) -> Stopwatch:
        return Stopwatch(timings, key, self.device)

    @contextlib.contextmanager
    def _text_encoder_on_device(self) -> Iterator[None]:
        """With offload, T5 visits the GPU for the prompts only."""
        if self.offload:
            self.text_encoder.model.to(self.device)
        try:
            yield
        finally:
            if self.offload:
                self.text_encoder.model.cpu()
                release_cached_memory()


def warm_up_speech(audio_encoder) -> float:
    """The speech encoder's first call, on a second of silence: wav2vec2's first call on a GPU
    takes seconds of one-time set-up (14 s measured in a first job on an H200, 0.03 s in the next),
    and the audio stack's first `librosa.load` compiles numba functions (15.5 s without numba's
    cache). Its seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        silence = Path(folder) / "silence.wav"
        soundfile.write(str(silence), np.zeros(16000, dtype=np.float32), 16000)
        with without_tf32():
            audio_encoder.extract_audio_feat(str(silence), return_all_layers=True)
    return time.perf_counter() - start


def warm_up_vae(vae) -> float:
    """The VAE's first encode and decode, of one small frame: its first GPU convolutions set
    cuDNN up and load their kernels, which a first job would otherwise pay. Its seconds."""
    start = time.perf_counter()
    with torch.no_grad():
        pixels = torch.zeros(3, 1, 64, 64, device=vae.device)
        latents = vae.encode([pixels])
        for _ in vae.decode_chunks(latents[0]):
            pass
    return time.perf_counter() - start


def warm_up_dit(denoiser: Denoiser, resolutions: tuple[str, ...], max_area: dict[str, int],
                frames_per_clip: int = 80) -> dict[str, float]:
    """One sampling step per resolution at the size a 16:9 image gets there: the Denoiser
    compiles and picks its kernels before the first job. Seconds per resolution."""
    timings = {}
    for resolution in resolutions:
        size = video_size(*WARM_UP_IMAGE_SIZE, max_area[resolution], resolution)
        compiled_s, call_s = denoiser.warm_up(size, frames_per_clip, MOTION_FRAMES,
                                              latent_frames(frames_per_clip))
        timings[resolution] = compiled_s
        logger.info("warm-up at %s (%dx%d): %.1f s, then %.2f s per DiT call", resolution,
                    size[1], size[0], compiled_s, call_s)
    return timings
