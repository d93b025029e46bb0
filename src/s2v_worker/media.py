"""Media intake: turn the job's image, audio and pose video (URL or base64) into checked local files.

Every input is proven by decoding it before any model work: the image through Pillow, the audio
through ffmpeg into a WAV that the model stage reads, the pose video through decord. A bad input
raises `MediaError`, whose message names the job field and says what is wrong; it is safe to
return to the client. Files are written inside the job's own temporary folder only, under fixed
names: nothing in a path comes from the job.
"""
from __future__ import annotations

import base64
import binascii
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import requests
import soundfile
from PIL import Image, ImageOps

from .job import MediaSource
from .settings import Settings

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)
MIN_IMAGE_SIDE = 16
_DOWNLOAD_CHUNK = 1 << 16


class MediaError(ValueError):
    """An input could not be fetched or decoded. The message is safe to return to the client."""


@dataclass(frozen=True)
class ImageInput:
    path: Path  # RGB PNG, EXIF orientation applied
    width: int
    height: int


@dataclass(frozen=True)
class AudioInput:
    original_path: Path  # as received; muxed into the MP4
    model_path: Path  # the same audio decoded to WAV (float32, source rate) for the model
    duration_s: float
    sample_rate: int


# --- fetching ----------------------------------------------------------------------------------------

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


def _download(source: MediaSource, max_bytes: int, timeout_s: float) -> bytes:
    try:
        with requests.get(source.url, stream=True, timeout=(timeout_s, timeout_s)) as response:
            if response.status_code != 200:
                raise MediaError(f"'{source.field}' could not be downloaded: HTTP {response.status_code}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise MediaError(f"'{source.field}' is larger than the {max_bytes} byte limit")
            chunks, received = [], 0
            for chunk in response.iter_content(_DOWNLOAD_CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise MediaError(f"'{source.field}' is larger than the {max_bytes} byte limit")
                chunks.append(chunk)
    except requests.RequestException as exc:
        raise MediaError(f"'{source.field}' could not be downloaded: {type(exc).__name__}") from None
    if not received:
        raise MediaError(f"'{source.field}' is empty")
    return b"".join(chunks)


def fetch(source: MediaSource, dest: Path, max_bytes: int, timeout_s: float) -> Path:
    data = _download(source, max_bytes, timeout_s) if source.url else _decode_base64(source, max_bytes)
    dest.write_bytes(data)
    logger.info("%s: received %d bytes", source.field, len(data))
    return dest


# --- decoding ----------------------------------------------------------------------------------------

def load_image(source: MediaSource, work_dir: Path, settings: Settings) -> ImageInput:
    raw = fetch(source, work_dir / "image.input", settings.max_image_bytes, settings.download_timeout_s)
    try:
        with Image.open(raw) as probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise MediaError(f"'{source.field}' has {width}x{height} pixels; the limit is "
                                 f"{MAX_IMAGE_PIXELS}")
            probe.load()  # decodes every pixel: truncated files fail here
            image = ImageOps.exif_transpose(probe).convert("RGB")
    except MediaError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"'{source.field}' is not a readable image ({type(exc).__name__})") from None
    if min(image.size) < MIN_IMAGE_SIDE:
        raise MediaError(f"'{source.field}' is {image.width}x{image.height}; both sides must be at "
                         f"least {MIN_IMAGE_SIDE} pixels")
    path = work_dir / "image.png"
    image.save(path)
    raw.unlink()
    return ImageInput(path=path, width=image.width, height=image.height)


def _ffmpeg_error_summary(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no error text"


def load_audio(source: MediaSource, work_dir: Path, settings: Settings) -> AudioInput:
    original = fetch(source, work_dir / "audio.input", settings.max_audio_bytes,
                     settings.download_timeout_s)
    model_path = work_dir / "audio.wav"
    # float32 at the source's own rate and channels: librosa then resamples and downmixes exactly as
    # it would the original file in the official code.
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(original),
               "-map", "0:a:0", "-vn", "-c:a", "pcm_f32le", "-f", "wav", str(model_path)]
    result = subprocess.run(command, capture_output=True, timeout=300)
    if result.returncode != 0 or not model_path.is_file():
        logger.info("audio decode failed: %s", _ffmpeg_error_summary(result.stderr))
        raise MediaError(f"'{source.field}' is not a readable audio file")
    try:
        info = soundfile.info(str(model_path))
    except RuntimeError:
        raise MediaError(f"'{source.field}' is not a readable audio file") from None
    duration = info.frames / info.samplerate if info.samplerate else 0.0
    if duration < settings.min_audio_seconds:
        raise MediaError(f"'{source.field}' is {duration:.2f} s long; the minimum is "
                         f"{settings.min_audio_seconds} s")
    if duration > settings.max_audio_seconds:
        raise MediaError(f"'{source.field}' is {duration:.1f} s long; the maximum is "
                         f"{settings.max_audio_seconds} s (MAX_AUDIO_SECONDS)")
    return AudioInput(original_path=original, model_path=model_path, duration_s=duration,
                      sample_rate=info.samplerate)


def load_pose_video(source: MediaSource, work_dir: Path, settings: Settings) -> Path:
    path = fetch(source, work_dir / "pose.mp4", settings.max_pose_video_bytes,
                 settings.download_timeout_s)
    try:
        from decord import VideoReader  # the official pose reader

        reader = VideoReader(str(path))
        frames = len(reader)
        reader.get_batch([0]).asnumpy()
    except Exception as exc:  # decord raises its own DECORDError and plain RuntimeErrors
        raise MediaError(f"'{source.field}' is not a readable video ({type(exc).__name__})") from None
    if frames < 1:
        raise MediaError(f"'{source.field}' has no frames")
    return path
