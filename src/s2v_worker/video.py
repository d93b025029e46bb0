"""The video encoding stage: the pipeline's frames plus the job's audio in, a playable MP4 out.

Frames arrive as the VAE decodes them and leave as an MP4 whose audio is the job's (AAC), cut to
the audio's length. At 16 fps the native frames go to the encoding ffmpeg as raw rgb24, untouched;
at 24 fps segments of them are interpolated with ffmpeg's motion-compensated `minterpolate` by
parallel ffmpeg processes, whose output the encoder takes in order (see `Mp4Stream`). The production image may
lack ffprobe, so what `EncodedVideo` reports comes from what ffmpeg was asked to make, its own frame
counter and the MP4's movie header, never from a second tool.

A streaming job also gets one MP4 per clip (`ClipEncoding`), cut from the very frames the whole
video's encoder takes: the same bytes go to a clip's encoder, so the clips played one after
another show the video's frames at the video's instants.

Over 500 lines on purpose: the whole video's encoder, its interpolating feeders and the
per-clip encoders share one frame clock and one set of ffmpeg processes; apart, the clips'
frame-for-frame match with the whole video would rest on two copies of that clock.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import queue
import re
import struct
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import imageio_ffmpeg
import torch

from .settings import VideoSettings

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

FRAMES_PER_WRITE = 8  # frames converted to rgb24 at a time
# Interpolation segments: output frames each (half a second at 24 fps), and native frames of
# context before a segment's first one.
SEGMENT_OUTPUT_FRAMES = 12
SEGMENT_CONTEXT_FRAMES = 2
INTERPOLATE_TIMEOUT_S = 300.0
# Convert to limited-range BT.709 once, before interpolation (minterpolate works in YUV); the
# encoder tags the stream so players do not guess BT.601.
_COLOR_FILTERS = ("scale=out_color_matrix=bt709:out_range=tv", "format=yuv420p")
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
class ClipSpan:
    """One clip's part of the video: output frames [first, end), from `start_s` for `duration_s`
    seconds (to the next clip's start; the last clip to the video's end, the audio's)."""

    index: int  # from 0
    count: int  # clips in the video
    first: int
    end: int
    start_s: float
    duration_s: float

    @property
    def num_frames(self) -> int:
        return self.end - self.first


@dataclass(frozen=True)
class _FramePlan:
    """How many frames go into ffmpeg and how many must come out."""

    output_frames: int  # frames of the final video, covering the audio
    input_frames: int  # native frames ffmpeg needs to produce them (short inputs repeat the last)
    shortfall: int  # native frames the pipeline gave fewer than the audio needs


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


@dataclass(frozen=True)
class _Segment:
    """Output frames [first, end) of the video, interpolated from native frames [lo, hi)."""
    first: int
    end: int
    lo: int
    hi: int


class Mp4Stream:
    """An MP4 encoded while the frames are still being made: `add` each clip's frames as they
    are decoded, then `finish` (or leave the `with` block, which stops ffmpeg on an error).

    At 24 fps the interpolation (ffmpeg's minterpolate, one thread per process) is the slow part:
    about 70 ms a frame at 480p. It runs on short segments of the video in parallel processes,
    each started as soon as its native frames are in (with two frames of context before and the
    lookahead after, so its frames are the single-pass ones but where minterpolate's motion
    search carries history across a segment's start); one more ffmpeg process encodes the
    segments in order with the audio. So the MP4 is ready soon after the last clip is decoded,
    whatever the video's length, and frames leave memory once their segments are done.
    """

    def __init__(self, width: int, height: int, native_fps: int, output_fps: int,
                 native_frames: int, audio_path: Path, duration_s: float, out_path: Path,
                 settings: VideoSettings, audio_start_s: float = 0.0,
                 clip_ends: Sequence[int] | None = None,
                 on_clip: Callable[[ClipEncoding], None] | None = None) -> None:
        """`audio_start_s`: where the video's audio starts in `audio_path` (a job's slice).
        `clip_ends` (streaming jobs): the native frame count at the end of each clip; each
        clip's MP4 is then encoded too (`clip_spans`), and handed to `on_clip` once its last
        frame is in its encoder (from the thread that feeds the encoders: `on_clip` must not
        block), for the caller to `finish` or `discard`."""
        if height % 2 or width % 2 or not height or not width:  # yuv420p halves both dimensions
            raise ValueError(f"frame width and height must be even, got {width}x{height}")
        if duration_s <= 0:
            raise ValueError(f"audio duration must be positive, got {duration_s}")
        self.width, self.height, self.out_path = width, height, out_path
        self.native_fps, self.output_fps = native_fps, output_fps
        self.interpolate = output_fps != native_fps
        self.plan = _plan_frames(native_frames, native_fps, output_fps, duration_s)
        if self.plan.shortfall:
            logger.warning("the pipeline gives %d frames, %d short of the audio's %.3f s; "
                           "repeating the last frame", native_frames, self.plan.shortfall,
                           duration_s)
        self._segments = _segments(self.plan, native_fps, output_fps) if self.interpolate else []
        self.clip_spans = (_clip_spans(self.plan, self._segments, clip_ends, output_fps,
                                       duration_s) if clip_ends else [])
        self._clip_command = functools.partial(
            _encoder_command, width, height, native_fps, output_fps, audio_path,
            settings=settings)
        self._audio_start_s = audio_start_s
        self._on_clip = on_clip
        self._frame_bytes = width * height * 3 // 2 if self.interpolate else width * height * 3
        self._written = 0  # output frames written to the encoder
        self._next_clip = 0  # of clip_spans: the next to hand over
        self._clip: ClipEncoding | None = None  # the one being fed, not handed over yet
        self._next_segment = 0
        self._frames: dict[int, bytes] = {}  # native index -> rgb24, while a segment needs it
        self._last_frame: bytes | None = None  # kept for `finish` to repeat: _frames lets go
        self._received = 0
        self._queue: queue.Queue = queue.Queue()  # results in output order (futures), then None
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                        thread_name_prefix="mp4-interpolate")
        self._log = tempfile.TemporaryFile()
        self._started = time.monotonic()
        command = _encoder_command(width, height, native_fps, output_fps, audio_path, duration_s,
                                   out_path, settings, audio_start_s)
        try:
            self._encoder = subprocess.Popen(command, stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=self._log)
        except OSError as exc:
            self._pool.shutdown()
            raise VideoEncodingError(f"could not start ffmpeg ({command[0]}): {exc}") from None
        self._writer = threading.Thread(target=self._write_in_order, name="mp4-writer",
                                        daemon=True)
        self._writer.start()
        self._writer_error: BaseException | None = None

    # --- input ---------------------------------------------------------------------------------

    def add(self, frames: torch.Tensor) -> None:
        """The next native frames, [3, n, H, W] floats in [-1, 1] (any device)."""
        if frames.shape[0] != 3 or tuple(frames.shape[2:]) != (self.height, self.width):
            raise ValueError(f"expected frames shaped [3, n, {self.height}, {self.width}], "
                             f"got {list(frames.shape)}")
        for start in range(0, frames.shape[1], FRAMES_PER_WRITE):
            pixels = _to_rgb24(frames[:, start:start + FRAMES_PER_WRITE])
            size = self.width * self.height * 3
            for offset in range(0, len(pixels), size):
                if self._received < self.plan.input_frames:
                    self._last_frame = pixels[offset:offset + size]
                    self._frames[self._received] = self._last_frame
                self._received += 1
        self._schedule()

    def finish(self) -> EncodedVideo:
        """Wait for the MP4 (the last frame repeated where the frames end before the audio)."""
        while self._received < self.plan.input_frames and self._last_frame is not None:
            self._frames[self._received] = self._last_frame
            self._received += 1
        last_frame_at = time.monotonic()
        self._schedule(final=True)
        self._queue.put(None)
        self._writer.join()
        returncode = self._encoder.wait()
        self._pool.shutdown()
        self._log.seek(0)
        stderr = self._log.read()
        self._log.close()
        self._discard_clip()  # only after a failure: the last clip is handed over at its end
        if returncode != 0 or self._writer_error is not None:
            self.out_path.unlink(missing_ok=True)
            detail = _tail(stderr) if returncode else f"{self._writer_error}"
            raise VideoEncodingError(f"ffmpeg exited with status {returncode}:\n{detail}")
        after_last_frame_s = time.monotonic() - last_frame_at
        encoded = _encoded(self.out_path, self.width, self.height, self.output_fps, stderr,
                           self.plan.output_frames)
        logger.info("encoded %d frames %dx%d at %d fps (%s) in %.2f s, %.2f s after the last "
                    "frame", encoded.num_frames, self.width, self.height, self.output_fps,
                    f"interpolated from {self.native_fps} fps" if self.interpolate else "native",
                    time.monotonic() - self._started, after_last_frame_s)
        return encoded

    def close(self) -> None:
        """Stop everything (the job failed or stopped before `finish`); idempotent."""
        if self._encoder.poll() is None:
            self._encoder.kill()
        self._queue.put(None)
        self._pool.shutdown(cancel_futures=True)
        self._writer.join()
        self._encoder.wait()
        self._discard_clip()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> "Mp4Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- work ----------------------------------------------------------------------------------

    def _schedule(self, final: bool = False) -> None:
        """Queue every piece of work whose native frames are all in, in output order."""
        available = min(self._received, self.plan.input_frames)
        if not self.interpolate:  # 16 fps: the native frames themselves
            count = min(available, self.plan.output_frames)
            pending = sorted(i for i in self._frames if i < count)
            if pending:
                done: Future = Future()
                done.set_result(b"".join(self._frames.pop(i) for i in pending))
                self._queue.put(done)
            return
        while self._next_segment < len(self._segments):
            segment = self._segments[self._next_segment]
            if segment.hi > available and not final:
                break
            native = [self._frames[i] for i in range(segment.lo, min(segment.hi, available))]
            self._queue.put(self._pool.submit(self._interpolate, segment, native))
            self._next_segment += 1
        keep_from = (self._segments[self._next_segment].lo
                     if self._next_segment < len(self._segments) else available)
        for index in [i for i in self._frames if i < keep_from]:
            del self._frames[index]

    def _interpolate(self, segment: _Segment, native: list[bytes]) -> bytes:
        """yuv420p frames [first, end) of the output, from one minterpolate process."""
        command = _interpolate_command(self.width, self.height, self.native_fps, self.output_fps,
                                       segment.lo)
        result = subprocess.run(command, input=b"".join(native), capture_output=True,
                                timeout=INTERPOLATE_TIMEOUT_S)
        if result.returncode != 0:
            raise VideoEncodingError(f"ffmpeg (interpolation) exited with status "
                                     f"{result.returncode}:\n{_tail(result.stderr)}")
        frame_bytes = self.width * self.height * 3 // 2
        produced_first = -(-segment.lo * self.output_fps // self.native_fps)
        start = (segment.first - produced_first) * frame_bytes
        data = result.stdout[start:start + (segment.end - segment.first) * frame_bytes]
        if len(data) != (segment.end - segment.first) * frame_bytes:
            raise VideoEncodingError("ffmpeg (interpolation) made fewer frames than expected")
        return data

    def _write_in_order(self) -> None:
        try:
            while (future := self._queue.get()) is not None:
                data = future.result()
                try:
                    self._encoder.stdin.write(data)
                except BrokenPipeError:  # ffmpeg stopped reading (-frames:v reached, or failed)
                    break
                if self.clip_spans:
                    self._feed_clips(data)
        except BaseException as exc:  # an interpolation failed: the encoder gets no more input
            self._writer_error = exc
            self._encoder.kill()
        finally:
            try:
                self._encoder.stdin.close()
            except BrokenPipeError:
                pass


    # --- the clips' MP4s (streaming jobs) --------------------------------------------------------

    def _feed_clips(self, data: bytes) -> None:
        """The frames just written to the video's encoder, to the clips' encoders they fall in;
        each clip is handed over as soon as its last frame is in (an empty one at once)."""
        frames = len(data) // self._frame_bytes
        done = 0
        while True:
            while (self._next_clip < len(self.clip_spans)
                   and self.clip_spans[self._next_clip].end <= self._written):
                self._hand_over_clip()
            if done == frames or self._next_clip == len(self.clip_spans):
                return
            span = self.clip_spans[self._next_clip]
            take = min(frames - done, span.end - self._written)
            if self._clip is None:
                self._clip = ClipEncoding(span, self.out_path.with_name(
                    f"clip{span.index:04d}.mp4"), self.width, self.height, self.output_fps,
                    self._clip_command, self._audio_start_s)
            self._clip.write(data[done * self._frame_bytes:(done + take) * self._frame_bytes])
            done += take
            self._written += take

    def _hand_over_clip(self) -> None:
        span = self.clip_spans[self._next_clip]
        clip = self._clip or ClipEncoding(span, None, self.width, self.height, self.output_fps,
                                          self._clip_command, self._audio_start_s)
        self._clip = None
        self._next_clip += 1
        clip.close_input()
        if self._on_clip is None:
            clip.discard()
            return
        self._on_clip(clip)

    def _discard_clip(self) -> None:
        """The clip being fed when the video's encoding stopped short: never handed over."""
        if self._clip is not None:
            self._clip.discard()
            self._clip = None


class ClipEncoding:
    """One clip's MP4, encoded from the video's own frames [first, end) (the bytes the video's
    encoder takes, with the same settings) and the audio under them; ffmpeg starts with the
    clip's first frame. A clip without frames of its own (`path` None) makes no file.

    Mp4Stream feeds it and hands it over; the receiver then calls `finish` (the MP4) or
    `discard`, from any thread."""

    def __init__(self, span: ClipSpan, path: Path | None, width: int, height: int, fps: int,
                 command: Callable[..., list[str]], audio_start_s: float) -> None:
        self.span, self.path = span, path
        self.width, self.height, self.fps = width, height, fps
        self._command = command
        self._audio_start_s = audio_start_s
        self._process: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile() if path is not None else None
        self.failure: str | None = None  # why no MP4 can come of it

    def write(self, data: bytes) -> None:
        if self.failure is not None:
            return
        try:
            if self._process is None:
                command = self._command(self.span.duration_s, self.path,
                                        audio_start_s=self._audio_start_s + self.span.start_s)
                self._process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                                 stdout=subprocess.DEVNULL, stderr=self._log)
            self._process.stdin.write(data)
        except OSError as exc:  # ffmpeg did not start, or stopped reading: the video goes on
            self.failure = f"ffmpeg took no more frames ({exc})"
            logger.warning("clip %d of %d: %s", self.span.index + 1, self.span.count,
                           self.failure)

    def close_input(self) -> None:
        if self._process is not None:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass

    def finish(self) -> EncodedVideo | None:
        """Wait for the clip's MP4; None for a clip without frames. Raises VideoEncodingError
        (the file removed)."""
        if self.path is None:
            return None
        if self._process is None:
            self.discard()
            raise VideoEncodingError(f"ffmpeg never started: {self.failure}")
        returncode = self._process.wait()
        self._log.seek(0)
        stderr = self._log.read()
        self._log.close()
        if returncode != 0 or self.failure is not None:
            self.path.unlink(missing_ok=True)
            raise VideoEncodingError(f"ffmpeg exited with status {returncode}:\n"
                                     f"{_tail(stderr) if returncode else self.failure}")
        return _encoded(self.path, self.width, self.height, self.fps, stderr,
                        self.span.num_frames)

    def discard(self) -> None:
        """Stop its ffmpeg and remove its file; idempotent."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _encoded(path: Path, width: int, height: int, fps: int, stderr: bytes,
             expected_frames: int) -> EncodedVideo:
    """What ffmpeg made: its own frame count, the movie header's duration."""
    counts = _FRAME_COUNTER.findall(stderr)
    num_frames = int(counts[-1]) if counts else expected_frames
    if num_frames != expected_frames:
        logger.warning("ffmpeg wrote %d frames to %s, expected %d", num_frames, path.name,
                       expected_frames)
    container_s = _mp4_duration_s(path)
    return EncodedVideo(path=path, width=width, height=height, fps=fps, num_frames=num_frames,
                        duration_s=container_s if container_s is not None else num_frames / fps,
                        size_bytes=path.stat().st_size)


def _clip_spans(plan: _FramePlan, segments: list[_Segment], clip_ends: Sequence[int],
                output_fps: int, duration_s: float) -> list[ClipSpan]:
    """Each clip's output frames: at 16 fps its own native frames; at 24 fps the segments that
    can be interpolated once its frames are in (all their native frames are), which is where the
    video's encoder gets them. So a clip's MP4 is ready right after the clip is decoded, without
    waiting for the next clip's frames; the few output frames between the clip's last native
    frame and its last complete segment open the next clip's MP4 (at most a segment, half a
    second). A clip shorter than that can have no frames of its own (infer_frames 8 at 24 fps)."""
    bounds = [0]
    for native_end in clip_ends[:-1]:
        if segments:  # segments are in order and their `hi` never decreases
            bound = next((s.first for s in segments if s.hi > native_end), plan.output_frames)
        else:
            bound = native_end
        bounds.append(min(max(bound, bounds[-1]), plan.output_frames))
    bounds.append(plan.output_frames)
    count = len(clip_ends)
    spans = []
    for index in range(count):
        first, end = bounds[index], bounds[index + 1]
        end_s = duration_s if index == count - 1 else end / output_fps
        spans.append(ClipSpan(index, count, first, end, round(first / output_fps, 6),
                              round(max(0.0, end_s - first / output_fps), 6)))
    return spans


def _segments(plan: _FramePlan, native_fps: int, output_fps: int) -> list[_Segment]:
    segments = []
    for first in range(0, plan.output_frames, SEGMENT_OUTPUT_FRAMES):
        end = min(first + SEGMENT_OUTPUT_FRAMES, plan.output_frames)
        # Output frame i lies at native position i * native / output; minterpolate needs the two
        # native frames around it and emits nothing past the second-to-last one it is given.
        lo = max(0, first * native_fps // output_fps - SEGMENT_CONTEXT_FRAMES)
        hi = min(plan.input_frames,
                 (end - 1) * native_fps // output_fps + INTERPOLATION_LOOKAHEAD_FRAMES)
        segments.append(_Segment(first, end, lo, hi))
    return segments


def _interpolate_command(width: int, height: int, native_fps: int, output_fps: int,
                         first_native: int) -> list[str]:
    # The segment's timestamps are shifted to its place in the video, so that minterpolate puts
    # its output frames at the same instants as for the whole video.
    filters = [f"setpts=PTS+{first_native}/({native_fps}*TB)", *_COLOR_FILTERS,
               f"minterpolate=fps={output_fps}:{MINTERPOLATE_OPTIONS}"]
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-framerate", str(native_fps), "-i", "pipe:0", "-vf", ",".join(filters),
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "pipe:1"]


def _audio_input(audio_path: Path, start_s: float, duration_s: float) -> tuple[list[str],
                                                                               list[str]]:
    """The encoder's audio input arguments, and its audio filter's, for [start_s, start_s +
    duration_s) of the file. From 0, an input-side -t. From later, `atrim` on the decoded
    samples: an input -ss lands near the instant, not on it, in MP3, AAC and Vorbis (up to 50
    samples off at 44.1 kHz, measured with ffmpeg 9), while atrim cuts at the sample, as the
    model's audio is cut (media.py)."""
    source = ["-i", f"file:{audio_path}"]  # file: so no name is read as a protocol or an option
    if start_s <= 0:
        # Input-side -t: an output-side -t would also drop the last video frame (its end lies
        # past the audio's) and, with -frames:v, ffmpeg 9 then ends the audio a packet early.
        return ["-t", f"{duration_s:.6f}", *source], []
    # -t only bounds the decoding; atrim cuts, and asetpts starts the audio at the video's start.
    return (["-t", f"{start_s + duration_s + 1:.6f}", *source],
            ["-af", f"atrim=start={start_s:.6f}:duration={duration_s:.6f},"
                    "asetpts=PTS-STARTPTS"])


def _encoder_command(width: int, height: int, native_fps: int, output_fps: int,
                     audio_path: Path, duration_s: float, out_path: Path,
                     settings: VideoSettings, audio_start_s: float = 0.0) -> list[str]:
    if output_fps != native_fps:  # interpolated segments, already BT.709 limited-range yuv420p
        video_input = ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}",
                       "-framerate", str(output_fps), "-i", "pipe:0"]
        # Say so: raw frames carry no colour tags, and ffmpeg would convert "unknown" to them.
        filters = ["-vf", "setparams=range=tv:colorspace=bt709:color_primaries=bt709:"
                          "color_trc=bt709"]
    else:
        video_input = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
                       "-framerate", str(native_fps), "-i", "pipe:0"]
        filters = ["-vf", ",".join(_COLOR_FILTERS)]
    audio_input, audio_filters = _audio_input(audio_path, audio_start_s, duration_s)
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "warning",
        "-stats", "-y", *video_input, *audio_input,
        "-map", "0:v:0", "-map", "1:a:0", "-map_metadata", "-1", *filters, *audio_filters,
        "-c:v", "libx264", "-preset", settings.preset, "-crf", str(settings.crf),
        "-pix_fmt", "yuv420p", "-colorspace", "bt709", "-color_primaries", "bt709",
        "-color_trc", "bt709", "-color_range", "tv", "-r", str(output_fps),
        "-c:a", "aac", "-b:a", settings.audio_bitrate,
        # No -frames:v: it gets exactly the frames up to the first one covering the audio's end
        # (at most one frame longer), and a frame limit would also cut the audio in ffmpeg 5.
        "-movflags", "+faststart", "-f", "mp4", f"file:{out_path}",
    ]


def _to_rgb24(chunk: torch.Tensor) -> bytes:
    pixels = ((chunk.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().cpu().numpy().tobytes()  # [n, H, W, 3]


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
