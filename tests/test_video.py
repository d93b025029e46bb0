"""The encoding stage against real ffmpeg: synthetic frames and audio in, MP4 checked by ffprobe."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
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


# --- a slice of the audio, and the clips of a streaming job ------------------------------------

def write_click_wav(path: Path, seconds: float, click_at_s: float, rate: int = 44100) -> Path:
    """Near-silence with one loud click: where it lands in an output shows where the audio was cut."""
    signal = np.zeros(int(round(seconds * rate)))
    signal[int(round(click_at_s * rate))] = 0.9
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((signal * 32767).astype("<i2").tobytes())
    return path


def click_time_s(path: Path, rate: int = 44100) -> float:
    raw = subprocess.run([SYSTEM_FFMPEG, "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1",
                          "-ar", str(rate), "-"], check=True, capture_output=True).stdout
    samples = np.abs(np.frombuffer(raw, "<f4"))
    return float(np.argmax(samples)) / rate


def frame_times(path: Path) -> list[float]:
    out = subprocess.run([FFPROBE, "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "frame=pts_time", "-of", "csv=p=0", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return [float(line.strip(",")) for line in out.split()]


def decode_yuv(path: Path) -> bytes:
    return subprocess.run([SYSTEM_FFMPEG, "-v", "error", "-i", str(path), "-f", "rawvideo",
                           "-pix_fmt", "yuv420p", "-"], check=True, capture_output=True).stdout


def encode_with_clips(frames: torch.Tensor, clip_ends: list[int], fps: int, audio: Path,
                      duration_s: float, folder: Path, settings: Settings = SETTINGS,
                      audio_start_s: float = 0.0, clip_command=None):
    """Mp4Stream as a streaming job runs it: each clip's frames added as the clip is decoded,
    the clips' MP4s collected as they are handed over."""
    clips = []
    with Mp4Stream(int(frames.shape[3]), int(frames.shape[2]), NATIVE_FPS, fps, frames.shape[1],
                   audio, duration_s, folder / "video.mp4", settings.video,
                   audio_start_s=audio_start_s, clip_ends=clip_ends, on_clip=clips.append) as stream:
        if clip_command is not None:
            stream._clip_command = clip_command
        for start, end in zip([0, *clip_ends[:-1]], clip_ends):
            stream.add(frames[:, start:end])
        video = stream.finish()
    return video, clips, stream.clip_spans


@pytest.mark.skipif(SYSTEM_FFMPEG is None, reason="ffmpeg decodes the outputs")
@pytest.mark.parametrize("fps", [24, NATIVE_FPS])
def test_the_clips_played_in_turn_are_the_videos_frames_at_its_instants(audio_dir: Path,
                                                                        tmp_path: Path, fps: int):
    """A 3-clip video (16 frames a clip, the first 3 short). The encoders are lossless here
    (VIDEO_CRF=0), so each decoded frame is exactly what went into its encoder: the clips' frames
    in turn must be the video's, byte for byte, at the video's instants (each clip's timestamps
    from 0, shifted by its start_s). With the default CRF both are lossy encodes of the same
    input, by encoders whose state differs: equal within the encoding's error (checked below)."""
    lossless = SETTINGS.replace(crf=0)
    video, clips, spans = encode_with_clips(moving_gradient(45), [13, 29, 45], fps,
                                            audio_dir / "speech_7.3.wav", 2.5, tmp_path, lossless,
                                            audio_start_s=0.3)
    assert [clip.span for clip in clips] == spans and len(spans) == 3
    encoded = [clip.finish() for clip in clips]
    assert [e.num_frames for e in encoded] == [s.num_frames for s in spans]
    assert sum(s.num_frames for s in spans) == video.num_frames == math.ceil(2.5 * fps)
    assert spans[0].first == 0 and all(a.end == b.first for a, b in zip(spans, spans[1:]))
    assert decode_yuv(video.path) == b"".join(decode_yuv(e.path) for e in encoded)
    video_times = frame_times(video.path)
    clip_times = [t + span.start_s for e, span in zip(encoded, spans) for t in frame_times(e.path)]
    assert clip_times == pytest.approx(video_times, abs=1e-6)
    for e, span in zip(encoded, spans):
        info = probe(e.path)
        assert span.start_s == pytest.approx(span.first / fps)
        assert info["video"]["avg_frame_rate"] == f"{fps}/1" and info["audio"]["codec_name"] == "aac"
        assert float(info["audio"]["duration"]) == pytest.approx(span.duration_s, abs=0.03)
    assert spans[-1].start_s + spans[-1].duration_s == pytest.approx(2.5)
    if fps == 24:  # the clips end where their segments do: the first at 12 frames, not 19.5
        assert [(s.first, s.end) for s in spans] == [(0, 12), (12, 36), (36, 60)]
    else:  # at 16 fps each clip is its own native frames
        assert [(s.first, s.end) for s in spans] == [(0, 13), (13, 29), (29, 40)]


@pytest.mark.skipif(SYSTEM_FFMPEG is None, reason="ffmpeg decodes the outputs")
def test_at_the_default_crf_the_clips_match_the_video_within_the_encoding_error(audio_dir: Path,
                                                                               tmp_path: Path):
    frames = moving_gradient(45)
    video, clips, spans = encode_with_clips(frames, [13, 29, 45], 24, audio_dir / "speech_7.3.wav",
                                            2.5, tmp_path)
    whole = decode_rgb(video.path, 96, 64).astype(np.float32)
    parts = np.concatenate([decode_rgb(clip.finish().path, 96, 64) for clip in clips])
    assert parts.shape == whole.shape
    parts = parts.astype(np.float32)
    # Two lossy encodes of the same frames: a few levels apart (2.9 of 255 at most, measured on
    # these small moving gradients), and each frame nearer its own than its neighbours.
    assert np.abs(parts - whole).mean(axis=(1, 2, 3)).max() < 4.0
    for i in range(1, len(whole) - 1):
        errors = [np.abs(parts[i] - whole[j]).mean() for j in (i - 1, i, i + 1)]
        assert errors[1] < min(errors[0], errors[2])


@pytest.mark.skipif(SYSTEM_FFMPEG is None, reason="ffmpeg decodes the outputs")
def test_audio_start_cuts_the_muxed_audio_at_its_instant(tmp_path: Path):
    """The click at 2.5 s of the file: from audio_start_s 1.0 it is at 1.5 s of the video, and in
    the clip that holds that instant at 1.5 s less the clip's start."""
    audio = write_click_wav(tmp_path / "click.wav", 4.0, 2.5)
    video, clips, spans = encode_with_clips(moving_gradient(40), [16, 32, 40], 24, audio, 2.25,
                                            tmp_path, audio_start_s=1.0)
    assert click_time_s(video.path) == pytest.approx(1.5, abs=0.002)
    assert float(probe(video.path)["audio"]["duration"]) == pytest.approx(2.25, abs=0.03)
    [holder] = [(c, s) for c, s in zip(clips, spans) if s.start_s <= 1.5 < s.start_s + s.duration_s]
    assert click_time_s(holder[0].finish().path) == pytest.approx(1.5 - holder[1].start_s, abs=0.002)


def test_a_clip_too_short_for_a_segment_of_its_own_is_handed_over_empty(audio_dir: Path,
                                                                         tmp_path: Path):
    """infer_frames 8: the first clip has 5 native frames, fewer than a 24 fps segment needs
    (SEGMENT_OUTPUT_FRAMES and the interpolation's lookahead): its frames open the next clip."""
    video, clips, spans = encode_with_clips(moving_gradient(21), [5, 13, 21], 24,
                                            audio_dir / "speech_2.3.wav", 21 / 16, tmp_path)
    assert spans[0].num_frames == 0 and clips[0].path is None and clips[0].finish() is None
    assert sum(clip.finish().num_frames for clip in clips[1:]) == video.num_frames


def test_a_failing_clip_encoder_leaves_the_video_whole(audio_dir: Path, tmp_path: Path):
    def broken(duration_s, path, **options):
        return [str(tmp_path / "no-such-ffmpeg")]

    video, clips, _ = encode_with_clips(moving_gradient(45), [13, 29, 45], 16,
                                        audio_dir / "speech_7.3.wav", 2.5, tmp_path,
                                        clip_command=broken)
    assert video.num_frames == 40 and video.path.is_file()
    for clip in clips:
        with pytest.raises(VideoEncodingError, match="ffmpeg never started"):
            clip.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


def test_a_video_stopped_short_discards_the_clip_it_was_feeding(audio_dir: Path, tmp_path: Path):
    """The job stopped during clip 2 (cancelled, or past its time limit): clip 1 was handed over
    (its receiver finishes or discards it), clip 2 is discarded with the video."""
    clips = []
    frames = moving_gradient(45)
    with Mp4Stream(96, 64, NATIVE_FPS, NATIVE_FPS, 45, audio_dir / "speech_7.3.wav", 2.5,
                   tmp_path / "video.mp4", SETTINGS.video, clip_ends=[13, 29, 45],
                   on_clip=clips.append) as stream:
        stream.add(frames[:, :20])
        deadline = time.monotonic() + 30
        while not clips and time.monotonic() < deadline:  # the writer hands clip 1 over
            time.sleep(0.01)
    assert [clip.span.index for clip in clips] == [0]
    assert sorted(p.name for p in tmp_path.glob("clip*")) == ["clip0000.mp4"]
    clips[0].discard()
    assert not list(tmp_path.glob("clip*"))
