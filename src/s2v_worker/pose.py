"""Pose conditioning: the official `load_pose_cond` for a driving pose video, in bounded memory.

The frames are decoded, normalised, resized and cropped in a child process (decord may crash or
hang on a hostile file; see decoders.py), and VAE-encoded here clip by clip.
"""
from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import torch

from .decoders import DecoderOutputEnded, DecoderPipe
from .errors import MediaError
from .planning import NATIVE_FPS, ClipPlan
from .vae import VideoVAE

logger = logging.getLogger(__name__)

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


@torch.no_grad()
def pose_latents(pose_video_path: Path, plan: ClipPlan, vae: VideoVAE, dtype: torch.dtype,
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
            latents.append(torch.stack(vae.encode(
                cond.to(dtype=dtype, device=vae.device)))[:, :, 1:].cpu())
    finally:
        pipe.close()
    return latents
