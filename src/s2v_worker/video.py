"""The video encoding stage: the pipeline's frames plus the job's audio in, a playable MP4 out.

Frames are streamed to ffmpeg's stdin as raw rgb24, the job's audio is muxed as AAC, and the result
is cut to the audio's length. At 24 fps the native 16 fps frames are interpolated with ffmpeg's
motion-compensated `minterpolate`; at 16 fps they pass through untouched. The production image may
lack ffprobe, so what `EncodedVideo` reports comes from what ffmpeg was asked to make, its own frame
counter and the MP4's movie header, never from a second tool.
"""
from __future__ import annotations

import logging
import math
import re
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import imageio_ffmpeg
import torch

from .settings import Settings

logger = logging.getLogger(__name__)

# Motion-compensated interpolation with bidirectional motion estimation: on a synthetic pan test
# it scored best of minterpolate's modes at about the same cost. FFmpeg applies mc_mode=aobmc and
# vsbmc only with bilateral estimation (me_mode=bilat), so with bidir they would change nothing;
# plain obmc is named to say so. Scene-change detection stays at its default: a cut falls back to
# repeating frames.
MINTERPOLATE_OPTIONS = "mi_mode=mci:mc_mode=obmc:me_mode=bidir:me=epzs"

# minterpolate emits nothing past the second-to-last input frame, so it needs two native frames
# beyond the last output instant; one more is a margin against rounding of timestamps.
INTERPOLATION_LOOKAHEAD_FRAMES = 3

FRAMES_PER_WRITE = 8  # frames converted and written per pipe write: bounded memory, few syscalls
STDERR_TAIL_LINES = 15
_FRAME_COUNTER = re.compile(rb"frame=\s*(\d+)")


class VideoEncodingError(RuntimeError):
    """ffmpeg could not make the output video. The message carries the end of ffmpeg's log."""


@dataclass(frozen=True)
class EncodedVideo:
    path: Path
    width: int
    height: int
    fps: int
    num_frames: int
    duration_s: float
    size_bytes: int


@dataclass(frozen=True)
class _FramePlan:
    """How many frames go into ffmpeg and how many must come out."""

    output_frames: int  # frames of the final video, covering the audio
    input_frames: int  # native frames ffmpeg needs to produce them (short inputs repeat the last)
    shortfall: int  # native frames the pipeline gave fewer than the audio needs


def encode_mp4(frames: torch.Tensor, native_fps: int, output_fps: int, audio_path: Path,
               duration_s: float, out_path: Path, settings: Settings) -> EncodedVideo:
    """Encode `frames` ([3, N, H, W], floats in [-1, 1]) and the audio into an H.264/AAC MP4.

    The file lasts `duration_s` (the audio's, or less when the caller cut the job short): the
    audio is cut there and the video ends on the first frame reaching it.
    """
    width, height = _check_frames(frames)
    if duration_s <= 0:
        raise ValueError(f"audio duration must be positive, got {duration_s}")
    interpolate = output_fps != native_fps
    plan = _plan_frames(frames.shape[1], native_fps, output_fps, duration_s)
    if plan.shortfall:
        logger.warning("the pipeline gave %d frames, %d short of the audio's %.3f s; repeating the "
                       "last frame", frames.shape[1], plan.shortfall, duration_s)
    command = _ffmpeg_command(width, height, native_fps, output_fps, plan.output_frames,
                              audio_path, duration_s, out_path, settings)
    started = time.monotonic()
    produced = _run_ffmpeg(command, _frame_chunks(frames, plan.input_frames), out_path)
    elapsed = time.monotonic() - started
    num_frames = produced if produced is not None else plan.output_frames
    if num_frames != plan.output_frames:
        logger.warning("ffmpeg wrote %d frames, expected %d", num_frames, plan.output_frames)
    logger.info("encoded %d frames %dx%d at %d fps (%s) in %.2f s", num_frames, width, height,
                output_fps, f"interpolated from {native_fps} fps" if interpolate else "native",
                elapsed)
    container_s = _mp4_duration_s(out_path)
    return EncodedVideo(
        path=out_path, width=width, height=height, fps=output_fps, num_frames=num_frames,
        duration_s=container_s if container_s is not None else num_frames / output_fps,
        size_bytes=out_path.stat().st_size)


def _check_frames(frames: torch.Tensor) -> tuple[int, int]:
    if frames.ndim != 4 or frames.shape[0] != 3 or frames.shape[1] < 1:
        raise ValueError(f"expected frames shaped [3, N, H, W], got {list(frames.shape)}")
    height, width = int(frames.shape[2]), int(frames.shape[3])
    if height % 2 or width % 2 or not height or not width:  # yuv420p halves both dimensions
        raise ValueError(f"frame width and height must be even, got {width}x{height}")
    return width, height


def _frames_covering(duration_s: float, fps: int) -> int:
    # The epsilon keeps float noise (2.3 * 24 = 55.199999...) from adding a whole frame.
    return max(1, math.ceil(duration_s * fps - 1e-6))


def _plan_frames(available: int, native_fps: int, output_fps: int,
                 duration_s: float) -> _FramePlan:
    output_frames = _frames_covering(duration_s, output_fps)
    if output_fps == native_fps:
        needed = output_frames
    else:
        last_instant_in_native_frames = (output_frames - 1) * native_fps / output_fps
        needed = math.ceil(last_instant_in_native_frames - 1e-6) + INTERPOLATION_LOOKAHEAD_FRAMES
    # Repeating the last frame for minterpolate's lookahead is routine; only frames missing
    # inside the audio's span mean the caller fell short.
    shortfall = max(0, _frames_covering(duration_s, native_fps) - available)
    return _FramePlan(output_frames=output_frames, input_frames=needed, shortfall=shortfall)


def _ffmpeg_command(width: int, height: int, native_fps: int, output_fps: int, output_frames: int,
                    audio_path: Path, duration_s: float, out_path: Path,
                    settings: Settings) -> list[str]:
    # Convert to limited-range BT.709 once, before interpolation (minterpolate works in YUV), and
    # tag the stream so players do not guess BT.601.
    filters = ["scale=out_color_matrix=bt709:out_range=tv", "format=yuv420p"]
    if output_fps != native_fps:
        filters.append(f"minterpolate=fps={output_fps}:{MINTERPOLATE_OPTIONS}")
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "warning",
        "-stats", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
        "-framerate", str(native_fps), "-i", "pipe:0",
        # Input-side -t: an output-side -t would also drop the last video frame (its end lies
        # past the audio's) and, with -frames:v, ffmpeg 9 then ends the audio a packet early.
        "-t", f"{duration_s:.6f}",
        "-i", f"file:{audio_path}",  # file: so no name is read as a protocol or an option
        "-map", "0:v:0", "-map", "1:a:0", "-map_metadata", "-1",
        "-vf", ",".join(filters),
        "-c:v", "libx264", "-preset", settings.video_preset, "-crf", str(settings.video_crf),
        "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709",
        "-color_trc", "bt709", "-color_range", "tv", "-r", str(output_fps),
        "-c:a", "aac", "-b:a", settings.video_audio_bitrate,
        # The video stops at the first frame covering the audio's end: at most one frame longer.
        "-frames:v", str(output_frames),
        "-movflags", "+faststart", "-f", "mp4", f"file:{out_path}",
    ]


def _to_rgb24(chunk: torch.Tensor) -> bytes:
    pixels = ((chunk.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy().tobytes()  # [n, H, W, 3]


def _frame_chunks(frames: torch.Tensor, count: int) -> Iterator[bytes]:
    """rgb24 bytes of the first `count` frames, the last frame repeated when there are fewer."""
    available = min(count, frames.shape[1])
    for start in range(0, available, FRAMES_PER_WRITE):
        yield _to_rgb24(frames[:, start:min(start + FRAMES_PER_WRITE, available)])
    if count > available:
        last = _to_rgb24(frames[:, available - 1:available])
        for _ in range(count - available):
            yield last


def _run_ffmpeg(command: list[str], chunks: Iterator[bytes], out_path: Path) -> int | None:
    """Feed `chunks` to ffmpeg and return the frame count it reported (None if unreadable)."""
    # stderr goes to an anonymous temp file: ffmpeg can never block on a full stderr pipe while
    # this thread blocks writing its stdin, and the file vanishes on close.
    with tempfile.TemporaryFile() as log:
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=log)
        except OSError as exc:
            raise VideoEncodingError(f"could not start ffmpeg ({command[0]}): {exc}") from None
        try:
            _feed(process.stdin, chunks)
        finally:
            returncode = process.wait()
        log.seek(0)
        stderr = log.read()
    if returncode != 0:
        out_path.unlink(missing_ok=True)
        raise VideoEncodingError(f"ffmpeg exited with status {returncode}:\n{_tail(stderr)}")
    counts = _FRAME_COUNTER.findall(stderr)
    return int(counts[-1]) if counts else None


def _feed(stdin: BinaryIO, chunks: Iterator[bytes]) -> None:
    try:
        for chunk in chunks:
            stdin.write(chunk)
    except BrokenPipeError:
        # ffmpeg stops reading once -frames:v is reached, or when it fails; its exit status says
        # which.
        pass
    finally:
        try:
            stdin.close()
        except BrokenPipeError:
            pass


def _tail(stderr: bytes) -> str:
    # Progress lines end in \r; split on both so the tail is the last real messages.
    lines = [line.strip() for line in re.split(rb"[\r\n]+", stderr) if line.strip()]
    return "\n".join(line.decode("utf-8", "replace") for line in lines[-STDERR_TAIL_LINES:])


def _mp4_duration_s(path: Path) -> float | None:
    """Duration from the movie header ('moov' > 'mvhd'), or None when it cannot be read."""
    try:
        with path.open("rb") as mp4:
            moov = _find_box(mp4, b"moov", 0, path.stat().st_size)
            if moov is None:
                return None
            mvhd = _find_box(mp4, b"mvhd", *moov)
            if mvhd is None:
                return None
            mp4.seek(mvhd[0])
            header = mp4.read(32)
            if header[:1] == b"\x01":  # version 1: 64-bit times
                timescale, duration = struct.unpack(">IQ", header[20:32])
            else:
                timescale, duration = struct.unpack(">II", header[12:20])
    except (OSError, struct.error):  # unreadable or truncated: the caller falls back
        return None
    return duration / timescale if timescale else None


def _find_box(mp4: BinaryIO, kind: bytes, start: int, end: int) -> tuple[int, int] | None:
    """(payload start, payload end) of the first box of `kind` between `start` and `end`."""
    position = start
    while position + 8 <= end:
        mp4.seek(position)
        size, box_kind = struct.unpack(">I4s", mp4.read(8))
        header_size = 8
        if size == 1:  # 64-bit size follows the type
            size = struct.unpack(">Q", mp4.read(8))[0]
            header_size = 16
        elif size == 0:  # box runs to the end of its parent
            size = end - position
        if size < header_size:
            return None
        if box_kind == kind:
            return position + header_size, position + size
        position += size
    return None
