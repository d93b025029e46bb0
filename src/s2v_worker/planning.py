"""A job's shape before any model work: the video's size, its clips, and the DiT's tokens per call.

Everything here is arithmetic on the job's settings, the image's size (from its header, read once
by the media intake) and the audio's length: the runner plans a job, checks its estimate and
refuses it if need be before the GPU does anything. The sizing is the official one
(`WanS2V.get_size_less_than_area`), the clip count covers the whole audio (`plan_clip_count`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .job import GenerationSettings, JobInputError
from .official import import_official

_official = import_official()
_WanS2V = _official.speech2video.WanS2V

NATIVE_FPS = _official.config.sample_fps  # 16: Wan2.2-S2V samples video at 16 fps
MOTION_FRAMES = _official.config.transformer.motion_frames  # pixels of motion context per clip
DROP_FIRST_MOTION = _official.config.drop_first_motion
# The smallest side the model can make: the VAE's stride (8) times the DiT's patch (2). The official
# sizing gives multiples of 64, or 0 for images far wider than tall (or the reverse).
LATENT_PATCH_PIXELS = 16
FIRST_CLIP_DROPPED_FRAMES = 3  # WanS2V.generate drops the first 3 frames of clip 0 when drop_first_motion
WARM_UP_IMAGE_SIZE = (1280, 720)  # (width, height) of the 16:9 image the warm-up sizes its steps for


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
    def native_clip_ends(self) -> list[int]:
        """The native frame count at the end of each clip (the first drops `dropped_frames`)."""
        return [(clip + 1) * self.frames_per_clip - self.dropped_frames
                for clip in range(self.num_clips)]

    @property
    def video_seconds(self) -> float:
        """Length of the finished video: the audio's, unless max_clips cut it shorter."""
        return min(self.audio_seconds, self.native_frames / self.native_fps)

    @property
    def dit_tokens(self) -> int:
        """Tokens of the noisy latents in one DiT call (WanS2V.generate's `max_seq_len`)."""
        return dit_tokens(self.height, self.width, self.frames_per_clip)


def video_size(width: int, height: int, max_area: int, resolution: str,
               field: str = "image") -> tuple[int, int]:
    """(height, width) of the video made from a `width` x `height` image, sized the official way
    (`get_size_less_than_area`) within `max_area` pixels.

    Raises JobInputError when a side ends below one latent patch, which the official sizing does
    for images far wider than tall or the reverse (its fallback rounds a side down to 0).
    """
    # The official method reads nothing of its instance.
    video_height, video_width = _WanS2V.get_size_less_than_area(None, height, width,
                                                                 target_area=max_area)
    if min(video_height, video_width) < LATENT_PATCH_PIXELS:
        shape, side = ("wide", "high") if video_height < video_width else ("tall", "wide")
        raise JobInputError(
            f"'{field}' is {width}x{height}, too {shape} for {resolution}: the model's sizing "
            f"would make the video {min(video_height, video_width)} pixels {side} (each side "
            f"needs at least {LATENT_PATCH_PIXELS}); crop the image closer to a video's shape")
    return video_height, video_width


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


def plan_clips(size: tuple[int, int], audio_seconds: float,
               settings: GenerationSettings) -> ClipPlan:
    """The job's clips at `size` (video_size's (height, width))."""
    drops_first = DROP_FIRST_MOTION and not settings.init_first_frame
    dropped = FIRST_CLIP_DROPPED_FRAMES if drops_first else 0
    clips = plan_clip_count(audio_seconds, settings.infer_frames, dropped, settings.max_clips)
    return ClipPlan(height=size[0], width=size[1], num_clips=clips,
                    frames_per_clip=settings.infer_frames, dropped_frames=dropped,
                    audio_seconds=audio_seconds)


def latent_frames(frames_per_clip: int) -> tuple[int, int]:
    """(motion latent frames, new latent frames per clip), as WanS2V.generate counts them."""
    motion = (MOTION_FRAMES + 3) // 4
    return motion, (frames_per_clip + 3 + MOTION_FRAMES) // 4 - motion


def dit_tokens(height: int, width: int, frames_per_clip: int) -> int:
    """Tokens of the noisy latents in one DiT call: WanS2V.generate's `max_seq_len`."""
    _, lat_frames = latent_frames(frames_per_clip)
    return lat_frames * (height // 8) * (width // 8) // 4
