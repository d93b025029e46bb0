"""The encoding stage against real ffmpeg: synthetic frames and audio in, MP4 checked by ffprobe."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from s2v_worker.settings import Settings
from s2v_worker.video import EncodedVideo, Mp4Stream, VideoEncodingError

FFPROBE = shutil.which("ffprobe")
SYSTEM_FFMPEG = shutil.which("ffmpeg")
pytestmark = pytest.mark.skipif(FFPROBE is None, reason="ffprobe is needed to check the output")

NATIVE_FPS = 16
SAMPLE_RATE = 16000
SETTINGS = Settings.from_env({})


def encode_mp4(frames: torch.Tensor, native_fps: int, output_fps: int, audio_path: Path,
               duration_s: float, out_path: Path, settings: Settings) -> EncodedVideo:
    """Frames [3, N, H, W] in [-1, 1] all at hand, encoded with the audio: `Mp4Stream` with one
    chunk (the worker adds each clip's frames as they are decoded)."""
    if frames.ndim != 4 or frames.shape[0] != 3 or frames.shape[1] < 1:
        raise ValueError(f"expected frames shaped [3, N, H, W], got {list(frames.shape)}")
    with Mp4Stream(int(frames.shape[3]), int(frames.shape[2]), native_fps, output_fps,
                   frames.shape[1], audio_path, duration_s, out_path, settings.video) as stream:
        stream.add(frames)
        return stream.finish()


def write_wav(path: Path, seconds: float) -> Path:
    t = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def moving_gradient(num_frames: int, height: int = 64, width: int = 96) -> torch.Tensor:
    """[3, N, H, W] in [-1, 1]; each frame shifts visibly, so frames can be told apart."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    frames = [torch.stack([torch.sin(2 * math.pi * (x + 0.07 * i)) + 0 * y,
                           torch.cos(2 * math.pi * (y - 0.05 * i)) + 0 * x,
                           2 * x * y - 1 + 0 * x])
              for i in range(num_frames)]
    return torch.stack(frames, dim=1)


def probe(path: Path) -> dict:
    result = subprocess.run([FFPROBE, "-v", "error", "-show_streams", "-show_format", "-of", "json",
                             str(path)], check=True, capture_output=True)
    info = json.loads(result.stdout)
    info["video"] = next(s for s in info["streams"] if s["codec_type"] == "video")
    info["audio"] = next(s for s in info["streams"] if s["codec_type"] == "audio")
    return info


def decode_rgb(path: Path, width: int, height: int) -> np.ndarray:
    raw = subprocess.run([SYSTEM_FFMPEG, "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def as_uint8(frames: torch.Tensor) -> np.ndarray:
    return ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def assert_faststart(path: Path) -> None:
    data = path.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def assert_matches_probe(encoded: EncodedVideo, info: dict, path: Path) -> None:
    assert encoded.path == path
    assert (encoded.width, encoded.height) == (info["video"]["width"], info["video"]["height"])
    assert encoded.num_frames == int(info["video"]["nb_frames"])
    assert encoded.duration_s == pytest.approx(float(info["format"]["duration"]), abs=0.01)
    assert encoded.size_bytes == path.stat().st_size == int(info["format"]["size"])


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    write_wav(folder / "speech_2.3.wav", 2.3)
    write_wav(folder / "speech_7.3.wav", 7.3)
    return folder


@pytest.mark.parametrize("seconds", [2.3, 7.3])
def test_24fps_is_interpolated_h264_aac_cut_to_the_audio(audio_dir: Path, tmp_path: Path,
                                                        seconds: float) -> None:
    frames = moving_gradient(math.ceil(seconds * NATIVE_FPS))
    out = tmp_path / "out.mp4"
    encoded = encode_mp4(frames, NATIVE_FPS, 24, audio_dir / f"speech_{seconds}.wav", seconds,
                         out, SETTINGS)
    info = probe(out)
    assert info["video"]["codec_name"] == "h264"
    assert info["video"]["pix_fmt"] == "yuv420p"
    assert info["video"]["avg_frame_rate"] == "24/1"
    assert info["audio"]["codec_name"] == "aac"
    assert float(info["format"]["duration"]) == pytest.approx(seconds, abs=0.1)
    assert float(info["audio"]["duration"]) == pytest.approx(seconds, abs=0.05)
    assert int(info["video"]["nb_frames"]) == math.ceil(seconds * 24)
    assert encoded.fps == 24
    assert_matches_probe(encoded, info, out)
    assert_faststart(out)


def test_16fps_keeps_the_native_frames(audio_dir: Path, tmp_path: Path) -> None:
    seconds = 2.3
    frames = moving_gradient(60)  # more than the audio needs: the surplus is dropped
    out = tmp_path / "out.mp4"
    encoded = encode_mp4(frames, native_fps=NATIVE_FPS, output_fps=16,  # as the runner calls it
                         audio_path=audio_dir / "speech_2.3.wav", duration_s=seconds,
                         out_path=out, settings=SETTINGS)
    info = probe(out)
    assert info["video"]["avg_frame_rate"] == "16/1"
    assert int(info["video"]["nb_frames"]) == math.ceil(seconds * NATIVE_FPS) == 37
    assert float(info["format"]["duration"]) == pytest.approx(seconds, abs=0.1)
    assert_matches_probe(encoded, info, out)
    assert_faststart(out)
    # Each decoded frame is its own source frame (lossy), not a neighbour or a blend of two.
    decoded = decode_rgb(out, 96, 64).astype(np.float32)
    source = as_uint8(frames[:, :37]).astype(np.float32)
    for i in range(1, 36):
        errors = [np.abs(decoded[i] - source[j]).mean() for j in (i - 1, i, i + 1)]
        assert errors[1] < 6 and errors[1] < min(errors[0], errors[2]) / 3


@pytest.mark.skipif(SYSTEM_FFMPEG is None, reason="ffmpeg makes the compressed audio inputs")
@pytest.mark.parametrize("suffix, codec", [("mp3", "libmp3lame"), ("ogg", "libvorbis"),
                                           ("m4a", "aac"), ("flac", "flac")])
def test_compressed_audio_inputs(audio_dir: Path, tmp_path: Path, suffix: str, codec: str) -> None:
    audio = tmp_path / f"speech.{suffix}"
    subprocess.run([SYSTEM_FFMPEG, "-v", "error", "-i", str(audio_dir / "speech_2.3.wav"),
                    "-c:a", codec, str(audio)], check=True)
    out = tmp_path / "out.mp4"
    encode_mp4(moving_gradient(37), NATIVE_FPS, 16, audio, 2.3, out, SETTINGS)
    info = probe(out)
    assert info["audio"]["codec_name"] == "aac"
    assert float(info["format"]["duration"]) == pytest.approx(2.3, abs=0.1)


@pytest.mark.parametrize("fps", [24, NATIVE_FPS])  # interpolated, and the native frames as they are
def test_frames_short_of_the_audio_repeat_the_last_frame(audio_dir: Path, tmp_path: Path,
                                                         fps: int) -> None:
    out = tmp_path / "out.mp4"
    encoded = encode_mp4(moving_gradient(32), NATIVE_FPS, fps, audio_dir / "speech_2.3.wav", 2.3,
                         out, SETTINGS)  # 32 frames cover 2.0 s of 2.3 s
    info = probe(out)
    assert float(info["audio"]["duration"]) == pytest.approx(2.3, abs=0.05)
    assert float(info["format"]["duration"]) == pytest.approx(2.3, abs=0.1)
    assert encoded.num_frames == math.ceil(2.3 * fps)


def test_duration_shorter_than_the_audio_cuts_both_streams(audio_dir: Path, tmp_path: Path) -> None:
    # max_clips can end the video before the speech does: the file follows the video's length.
    out = tmp_path / "out.mp4"
    encode_mp4(moving_gradient(32), NATIVE_FPS, 24, audio_dir / "speech_7.3.wav", 2.0, out,
               SETTINGS)
    info = probe(out)
    assert float(info["audio"]["duration"]) == pytest.approx(2.0, abs=0.05)
    assert float(info["format"]["duration"]) == pytest.approx(2.0, abs=0.1)


def test_missing_audio_raises_with_ffmpeg_log(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(VideoEncodingError) as caught:
        encode_mp4(moving_gradient(20), NATIVE_FPS, 24, tmp_path / "absent.wav", 1.0, out,
                   SETTINGS)
    assert "absent.wav" in str(caught.value)
    assert not out.exists()


def test_odd_frame_size_is_refused(audio_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        encode_mp4(moving_gradient(20, height=63), NATIVE_FPS, 16, audio_dir / "speech_2.3.wav",
                   1.0, tmp_path / "out.mp4", SETTINGS)
