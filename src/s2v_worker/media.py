"""Media intake: turn the job's image, audio and pose video (URL or base64) into checked local files.

Every input is proven by decoding it before any model work: the image through Pillow, the audio
through ffmpeg, streamed and resampled into the mono 16 kHz WAV that the model stage reads, the pose
video through decord. A bad input raises `MediaError`, whose message names the job field and says
what is wrong; it is safe to return to the client. Files are written inside the job's own
temporary folder only, under fixed names: nothing in a path comes from the job.

URLs are fetched through net.py, so that no job can make the worker reach inside its own network
(SSRF); decoders run in child processes (decoders.py).
"""
from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import librosa
import numpy as np
import soundfile
import soxr
from PIL import Image, ImageOps

from .decoders import DecoderOutputEnded, DecoderPipe, error_summary, run_decoder
from .errors import MediaError
from .job import AudioSlice, MediaSource
from .net import download
from .settings import MediaSettings, NetworkSettings

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 16

# Pillow formats refused although Pillow knows them: EPS is rendered by running Ghostscript.
_REFUSED_IMAGE_FORMATS = frozenset({"EPS"})

# The model reads speech as the official AudioEncoder loads it: librosa.load(path, sr=16000), i.e. the
# float32 samples, averaged over channels, resampled by soxr at "soxr_hq".
AUDIO_MODEL_RATE = 16_000
# Below this there is no speech for wav2vec2 to hear (telephone audio is 8 kHz); it also keeps the
# resampler's upsampling ratio sane.
MIN_AUDIO_SAMPLE_RATE = 4_000
_AUDIO_BLOCK_FRAMES = 1 << 16  # source frames downmixed and resampled at a time
_WAV_CHUNK_LIMIT = 1 << 16  # ffmpeg's header chunks (fmt, LIST) are far smaller

# Demuxers ffmpeg may use for the audio. Playlist and script formats (hls, concat, ...) are left
# out: they make ffmpeg open further files or URLs named inside the input.
AUDIO_DEMUXERS = ("wav", "w64", "mp3", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf",
                  "amr", "asf", "avi", "mpegts", "ac3", "eac3", "wv", "au")



@dataclass(frozen=True)
class ImageInput:
    path: Path  # RGB PNG, EXIF orientation applied
    width: int
    height: int


# How far past the audio's end a slice may reach and still be taken as ending there: rounding in
# a client's arithmetic (or a result's echoed audio_duration_s sent back), not a real overrun.
AUDIO_SLICE_TOLERANCE_S = 1e-3


@dataclass(frozen=True)
class AudioInput:
    original_path: Path  # as received; muxed into the MP4 (its [start_s, start_s + duration_s))
    model_path: Path  # mono float32 at 16 kHz: what librosa.load(original, sr=16000) returns,
    # cut to the slice by samples
    duration_s: float  # of the slice the video speaks (the whole audio unless the job sliced it)
    sample_rate: int  # the source's
    channels: int  # the source's
    start_s: float = 0.0  # where the slice starts in the original


# --- fetching ------------------------------------------------------------------------------------

def _decode_base64(source: MediaSource, max_bytes: int) -> bytes:
    text = source.base64.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise MediaError(f"'{source.field}' is a data URI without ';base64,' data")
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_bytes:
        raise MediaError(f"'{source.field}' is larger than the {max_bytes} byte limit")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"'{source.field}' is not valid base64") from None
    if not data:
        raise MediaError(f"'{source.field}' decodes to no data")
    return data


def fetch(source: MediaSource, dest: Path, max_bytes: int, network: NetworkSettings) -> Path:
    """Write the source's bytes (downloaded or base64-decoded) to `dest`, at most `max_bytes`."""
    if source.url:
        size = download(source.field, source.url, dest, max_bytes, network)
    else:
        data = _decode_base64(source, max_bytes)
        dest.write_bytes(data)
        size = len(data)
    logger.info("%s: received %d bytes", source.field, size)
    return dest


# --- what a file looks like ----------------------------------------------------------------------

def _sniff(head: bytes) -> str | None:
    """A rough kind for error messages ("an MP3 given as image"); None when unknown."""
    start = head.lstrip()[:64].lower()
    if start.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if start.startswith((b"{", b"[")):
        return "JSON text"
    if start.startswith(b"<?xml"):
        return "an XML document"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"II*\0", b"MM\0*")) or (
            head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "an image"
    if head.startswith((b"ID3", b"fLaC", b"OggS", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")) or (
            head[:4] == b"RIFF" and head[8:12] == b"WAVE"):
        return "audio"
    if head[4:8] == b"ftyp" or head.startswith(b"\x1aE\xdf\xa3") or (
            head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "a video (or audio) container"
    return None


def _unreadable(field: str, what: str, path: Path, expected: str, detail: str = "") -> MediaError:
    """"'audio_url' is not a readable audio file: it looks like an HTML page", or with `detail`."""
    with open(path, "rb") as f:
        kind = _sniff(f.read(64))
    if kind and kind != expected:
        return MediaError(f"'{field}' is not a readable {what}: it looks like {kind}")
    return MediaError(f"'{field}' is not a readable {what}{f' ({detail})' if detail else ''}")



# --- decoding ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _image_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(sorted(set(Image.OPEN) - _REFUSED_IMAGE_FORMATS))


def load_image(source: MediaSource, work_dir: Path, limits: MediaSettings,
               network: NetworkSettings) -> ImageInput:
    raw = fetch(source, work_dir / "image.input", limits.max_image_bytes, network)
    max_pixels = limits.max_image_pixels
    try:
        with Image.open(raw, formats=_image_formats()) as probe:
            width, height = probe.size
            if width * height > max_pixels:  # from the header, before any pixel is decoded
                raise MediaError(f"'{source.field}' has {width}x{height} pixels; the limit is "
                                 f"{max_pixels} (MAX_IMAGE_PIXELS)")
            probe.load()  # decodes every pixel: truncated files fail here
            # In place, and converted only when not RGB yet: at most two copies of the pixels are
            # alive at once (Pillow keeps 4 bytes a pixel: 512 MB at the 64 Mpx default limit).
            ImageOps.exif_transpose(probe, in_place=True)
            image = probe if probe.mode == "RGB" else probe.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(f"'{source.field}' has more pixels than Pillow's decompression-bomb "
                         "limit") from None
    except Exception as exc:  # Pillow's decoders raise many types on corrupt input (OSError,
        # SyntaxError, struct.error, EOFError, ...): each means the same thing here
        raise _unreadable(source.field, "image", raw, "an image", type(exc).__name__) from None
    if min(image.size) < MIN_IMAGE_SIDE:
        raise MediaError(f"'{source.field}' is {image.width}x{image.height}; both sides must be at "
                         f"least {MIN_IMAGE_SIDE} pixels")
    path = work_dir / "image.png"
    image.save(path)
    raw.unlink()
    return ImageInput(path=path, width=image.width, height=image.height)


def _wav_stream_format(pipe: DecoderPipe) -> tuple[int, int]:
    """(channels, sample rate) from the WAV header ffmpeg writes, leaving `pipe` at the samples."""
    riff = pipe.read_exact(12)
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise RuntimeError("ffmpeg did not write a WAV stream")
    fmt = None
    while True:
        chunk_id, size = struct.unpack("<4sI", pipe.read_exact(8))
        if chunk_id == b"data":  # its size is a placeholder on a pipe: the samples run to the end
            break
        if size > _WAV_CHUNK_LIMIT:
            raise RuntimeError(f"ffmpeg wrote a {size}-byte {chunk_id!r} WAV chunk")
        body = pipe.read_exact(size + (size & 1))
        if chunk_id == b"fmt ":
            fmt = body
    if fmt is None or len(fmt) < 16 or struct.unpack_from("<H", fmt, 14)[0] != 32:
        raise RuntimeError("ffmpeg's WAV stream is not 32-bit float")
    _, channels, rate = struct.unpack_from("<HHI", fmt)
    return channels, rate


class _ModelAudioWriter:
    """Turns float32 blocks of the source (any channels, any rate) into the mono 16 kHz WAV the
    model reads, with librosa.load's own steps so the samples are the ones it would return:
    `librosa.to_mono` on each block (a mean over channels, sample by sample), then soxr at
    "soxr_hq" as a stream (soxr's output does not depend on how its input is cut; checked against
    librosa.load in tests/test_media.py), then librosa's length fix (ceil of frames * ratio)."""

    def __init__(self, path: Path, field: str, channels: int, rate: int) -> None:
        self.field, self.channels, self.rate = field, channels, rate
        self.frames_in = 0
        self._resampler = (None if rate == AUDIO_MODEL_RATE else
                           soxr.ResampleStream(rate, AUDIO_MODEL_RATE, 1, dtype="float32",
                                               quality="soxr_hq"))
        self._out = soundfile.SoundFile(str(path), "w", samplerate=AUDIO_MODEL_RATE, channels=1,
                                        subtype="FLOAT")

    def write(self, raw: bytes | bytearray, last: bool) -> None:
        block = np.frombuffer(raw, dtype="<f4").reshape(-1, self.channels)
        if not np.isfinite(block).all():
            raise MediaError(f"'{self.field}' has samples that are not finite numbers (NaN or "
                             "infinity)")
        self.frames_in += len(block)
        mono = block[:, 0] if self.channels == 1 else librosa.to_mono(block.T)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono, last=last)
        self._out.write(mono)

    def finish(self) -> None:
        if self._resampler is not None:  # librosa.resample's fix_length, to the same count
            expected = int(np.ceil(self.frames_in * (float(AUDIO_MODEL_RATE) / self.rate)))
            written = self._out.frames
            if written > expected:
                self._out.truncate(expected)
            elif written < expected:
                self._out.write(np.zeros(expected - written, dtype=np.float32))
        self._out.close()

    def close(self) -> None:
        self._out.close()


def load_audio(source: MediaSource, work_dir: Path, limits: MediaSettings,
               network: NetworkSettings, audio_slice: AudioSlice = AudioSlice()) -> AudioInput:
    """The audio as received (for the MP4) and as the model reads it, decoded in bounded memory,
    and the slice of it the video speaks (`audio_slice`; by default the whole audio).

    ffmpeg decodes the file to float32 WAV on a pipe, at the source's own rate and channels, and
    the samples are downmixed and resampled here block by block (`_ModelAudioWriter`), so nothing
    larger than one block is ever held and the only file written is the model's own input (64 kB
    per second of audio). Before that, the stream's channels and rate are checked against
    MAX_AUDIO_CHANNELS and MAX_AUDIO_SAMPLE_RATE, and decoding stops a second past
    MAX_AUDIO_SECONDS. The limits apply to the whole file; the slice is then checked against its
    decoded length, and the model's WAV cut to it (`_cut_model_audio`).
    """
    field = source.field
    original = fetch(source, work_dir / "audio.input", limits.max_audio_bytes, network)
    model_path = work_dir / "audio.wav"
    model_path.unlink(missing_ok=True)
    # Decode at most a second past the limit: enough to tell that the audio is too long.
    cap_s = limits.max_audio_seconds + 1.0
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error",
               "-protocol_whitelist", "file", "-format_whitelist", ",".join(AUDIO_DEMUXERS),
               "-i", str(original), "-t", f"{cap_s:g}",
               "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    pipe = DecoderPipe(process, field)
    writer = None
    try:
        try:
            channels, rate = _wav_stream_format(pipe)
        except DecoderOutputEnded:
            logger.info("%s: audio decode failed (%s)", field, pipe.close_for_log())
            raise _unreadable(field, "audio file", original, "audio") from None
        _check_audio_format(field, channels, rate, limits)
        writer = _ModelAudioWriter(model_path, field, channels, rate)
        block_bytes = _AUDIO_BLOCK_FRAMES * channels * 4
        pending = bytearray()
        while piece := pipe.read():
            pending += piece
            while len(pending) >= block_bytes:
                writer.write(pending[:block_bytes], last=False)
                del pending[:block_bytes]
        writer.write(pending[:len(pending) - len(pending) % (channels * 4)], last=True)
        if pipe.close() != 0:
            logger.info("%s: audio decode failed (%s)", field, pipe.close_for_log())
            raise _unreadable(field, "audio file", original, "audio")
        writer.finish()
    finally:
        pipe.close()
        if writer is not None:
            writer.close()
    duration = writer.frames_in / rate
    if duration < limits.min_audio_seconds:
        raise MediaError(f"'{field}' is {duration:.2f} s long; the minimum is "
                         f"{limits.min_audio_seconds} s (MIN_AUDIO_SECONDS)")
    if duration > limits.max_audio_seconds:
        length = f"{duration:.1f} s" if duration < cap_s - 0.01 else f"more than {cap_s:g} s"
        raise MediaError(f"'{field}' is {length} long; the maximum is "
                         f"{limits.max_audio_seconds} s (MAX_AUDIO_SECONDS)")
    logger.info("%s: %.2f s of audio, %d channel(s) at %d Hz, decoded for the model", field,
                duration, channels, rate)
    if audio_slice.whole:
        return AudioInput(original_path=original, model_path=model_path, duration_s=duration,
                          sample_rate=rate, channels=channels)
    start_s, length_s = _slice_of(field, duration, audio_slice, limits)
    _cut_model_audio(model_path, start_s, length_s)
    logger.info("%s: the video speaks %.3f s of it, from %.3f s", field, length_s, start_s)
    return AudioInput(original_path=original, model_path=model_path, duration_s=length_s,
                      sample_rate=rate, channels=channels, start_s=start_s)


def _slice_of(field: str, duration: float, audio_slice: AudioSlice,
              limits: MediaSettings) -> tuple[float, float]:
    """(start, length) in seconds of the job's slice of an audio `duration` seconds long, or a
    MediaError naming the fields."""
    start = audio_slice.start_s
    if start >= duration:
        raise MediaError(f"'audio_start_s' is {start:g} s, at or past the end of '{field}', which "
                         f"is {duration:.3f} s long")
    if audio_slice.duration_s is None:
        length = duration - start
    else:
        end = start + audio_slice.duration_s
        if end > duration + AUDIO_SLICE_TOLERANCE_S:
            raise MediaError(f"'audio_start_s' + 'audio_duration_s' is {end:g} s, past the end of "
                             f"'{field}', which is {duration:.3f} s long")
        length = min(end, duration) - start
    if length < limits.min_audio_seconds:
        raise MediaError(f"the slice of '{field}' from 'audio_start_s' ({start:g} s) is "
                         f"{length:.3f} s long; the minimum is {limits.min_audio_seconds} s "
                         "(MIN_AUDIO_SECONDS)")
    return start, length


def _cut_model_audio(path: Path, start_s: float, length_s: float) -> None:
    """Keep the model's samples of [start_s, start_s + length_s): those of librosa.load(original,
    sr=16000)[round(start * 16000):round(end * 16000)]. At most MAX_AUDIO_SECONDS of 16 kHz
    float32 (19 MB at 300 s) is read."""
    first = round(start_s * AUDIO_MODEL_RATE)
    samples, _ = soundfile.read(str(path), start=first,
                                stop=round((start_s + length_s) * AUDIO_MODEL_RATE),
                                dtype="float32", always_2d=False)
    soundfile.write(str(path), samples, AUDIO_MODEL_RATE, subtype="FLOAT")


def _check_audio_format(field: str, channels: int, rate: int, limits: MediaSettings) -> None:
    if channels < 1:
        raise MediaError(f"'{field}' is not a readable audio file (no channels)")
    if channels > limits.max_audio_channels:
        raise MediaError(f"'{field}' has {channels} channels; the limit is "
                         f"{limits.max_audio_channels} (MAX_AUDIO_CHANNELS)")
    if rate > limits.max_audio_sample_rate:
        raise MediaError(f"'{field}' is sampled at {rate} Hz; the limit is "
                         f"{limits.max_audio_sample_rate} Hz (MAX_AUDIO_SAMPLE_RATE)")
    if rate < MIN_AUDIO_SAMPLE_RATE:
        raise MediaError(f"'{field}' is sampled at {rate} Hz; speech needs at least "
                         f"{MIN_AUDIO_SAMPLE_RATE} Hz")


def _is_video_container(head: bytes) -> bool:
    """MP4/MOV (ISO boxes), Matroska/WebM (EBML) or AVI, told by their first bytes.

    Why not leave it to decord: libavformat picks a demuxer by content, and decord's bundled copy
    reads an HLS playlist ("#EXTM3U ...") or an ffconcat script as a video whatever the file is
    called, then opens the files and URLs listed inside it, which would bypass every address check.
    Such formats cannot start with these signatures.
    """
    return (head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip")
            or head.startswith(b"\x1aE\xdf\xa3")
            or (head[:4] == b"RIFF" and head[8:12] == b"AVI "))


# Runs in a child process: a hostile file can make decord loop or crash, which must not hang or kill
# the worker. Decoding the first frame proves the stream decodes and gives its size.
_POSE_PROBE = """
import json, sys
from decord import VideoReader
reader = VideoReader(sys.argv[1])
frames = len(reader)
height, width = reader[0].shape[:2]
print(json.dumps({"frames": frames, "width": int(width), "height": int(height)}))
"""


def load_pose_video(source: MediaSource, work_dir: Path, limits: MediaSettings,
                    network: NetworkSettings) -> Path:
    path = fetch(source, work_dir / "pose.mp4", limits.max_pose_video_bytes, network)
    with open(path, "rb") as f:
        head = f.read(16)
    if not _is_video_container(head):
        kind = _sniff(head)
        raise MediaError(f"'{source.field}' is not an MP4, MOV, MKV, WebM or AVI video"
                         f"{f': it looks like {kind}' if kind else ''}")
    result = run_decoder(source.field, [sys.executable, "-I", "-c", _POSE_PROBE, str(path)],
                          "open as a video")
    try:
        if result.returncode != 0:
            raise ValueError(f"exit status {result.returncode}")
        probe = json.loads(result.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
        frames, width, height = int(probe["frames"]), int(probe["width"]), int(probe["height"])
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        logger.info("%s: pose video probe failed (%s): %s", source.field, exc,
                    error_summary(result.stderr))
        raise MediaError(f"'{source.field}' is not a readable video") from None
    if frames < 1:
        raise MediaError(f"'{source.field}' has no frames")
    if frames > limits.max_pose_video_frames:
        raise MediaError(f"'{source.field}' has {frames} frames; the limit is "
                         f"{limits.max_pose_video_frames} (MAX_POSE_VIDEO_FRAMES)")
    if max(width, height) > limits.max_pose_video_side:
        raise MediaError(f"'{source.field}' is {width}x{height}; the longest side may be "
                         f"{limits.max_pose_video_side} pixels (MAX_POSE_VIDEO_SIDE)")
    return path
